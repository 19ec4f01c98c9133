use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use super::conflist::{FileKind, NetworkConfig};
use super::*;

/// containerd's default `10-containerd-net.conflist`, with a firewall plugin at the end.
const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "containerd-net",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "promiscMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [
          [{
            "subnet": "10.88.0.0/16"
          }],
          [{
            "subnet": "2001:4860:4860::/64"
          }]
        ],
        "routes": [
          { "dst": "0.0.0.0/0" },
          { "dst": "::/0" }
        ]
      }
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true}
    },
    {
      "type": "firewall"
    }
  ]
}
"#;

/// Calico's `10-calico.conflist`: `name` before `cniVersion`, `type` first in each plugin,
/// four-space nesting inside.
const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "log_file_path": "/var/log/calico/cni/cni.log",
      "datastore_type": "kubernetes",
      "nodename": "node-1",
      "mtu": 0,
      "ipam": {
          "type": "calico-ipam"
      },
      "policy": {
          "type": "k8s"
      },
      "kubernetes": {
          "kubeconfig": "/etc/cni/net.d/calico-kubeconfig"
      }
    },
    {
      "type": "bandwidth",
      "capabilities": {"bandwidth": true}
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {"portMappings": true}
    }
  ]
}
"#;

/// A single-plugin configuration, as the CNI project's examples write one.
const SINGLE: &str = r#"{
    "cniVersion": "0.4.0",
    "name": "mynet",
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": true,
    "ipMasq": true,
    "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}
}
"#;

fn entry() -> PluginEntry {
    PluginEntry {
        agent_socket: "/var/run/ambit/cni.sock".into(),
        kubeconfig: Some("/etc/cni/net.d/ZZZ-ambit-cni-kubeconfig".into()),
        log_file: Some("/var/log/ambit-cni.log".into()),
    }
}

fn entry_json() -> Value {
    json!({
        "type": "ambit-cni",
        "agentSocket": "/var/run/ambit/cni.sock",
        "kubeconfig": "/etc/cni/net.d/ZZZ-ambit-cni-kubeconfig",
        "logFile": "/var/log/ambit-cni.log",
    })
}

fn conf_dir(files: &[(&str, &str)]) -> (TempDir, CniConfDir) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    let conf = CniConfDir::new(dir.path());
    (dir, conf)
}

fn plugins(path: &Path) -> Vec<Value> {
    let config: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    config["plugins"].as_array().unwrap().clone()
}

fn original_plugins(text: &str) -> Vec<Value> {
    let config: Value = serde_json::from_str(text).unwrap();
    config["plugins"].as_array().unwrap().clone()
}

/// The file's text up to the end of its last plugin.
fn up_to_last_plugin(text: &str) -> &str {
    &text[..=text.rfind("}\n  ]").unwrap()]
}

fn assert_inserted_last(original: &str, name: &str) {
    let (dir, conf) = conf_dir(&[(name, original)]);
    let path = dir.path().join(name);
    assert_eq!(
        conf.install(&entry()).unwrap(),
        ConfigChange::Inserted(path.clone())
    );

    let written = fs::read_to_string(&path).unwrap();
    // Everything before our entry is the file as it was, byte for byte.
    assert!(
        written.starts_with(up_to_last_plugin(original)),
        "{written}"
    );
    let mut expected = original_plugins(original);
    expected.push(entry_json());
    assert_eq!(plugins(&path), expected);
}

#[test]
fn inserts_last_in_a_bridge_chain() {
    assert_inserted_last(BRIDGE, "10-containerd-net.conflist");
}

#[test]
fn inserts_last_in_a_calico_chain() {
    assert_inserted_last(CALICO, "10-calico.conflist");
}

#[test]
fn converts_a_single_plugin_conf_into_a_list() {
    let (dir, conf) = conf_dir(&[("10-mynet.conf", SINGLE)]);
    let from = dir.path().join("10-mynet.conf");
    fs::set_permissions(&from, fs::Permissions::from_mode(0o640)).unwrap();
    let to = dir.path().join("10-mynet.conflist");

    let change = conf.install(&entry()).unwrap();
    assert_eq!(
        change,
        ConfigChange::Converted {
            from: from.clone(),
            to: to.clone()
        }
    );
    assert!(!from.exists());
    let written = fs::read_to_string(&to).unwrap();
    let list: Value = serde_json::from_str(&written).unwrap();
    assert_eq!(
        list,
        json!({
            "cniVersion": "0.4.0",
            "name": "mynet",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": true,
                    "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"},
                },
                entry_json(),
            ],
        })
    );
    // The plugin's members keep their order and text.
    assert!(written.contains(r#""ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}"#));
    assert!(written.find(r#""type": "bridge""#) < written.find(r#""bridge": "cni0""#));
    assert_eq!(
        fs::metadata(&to).unwrap().permissions().mode() & 0o777,
        0o640
    );

    assert_eq!(
        conf.install(&entry()).unwrap(),
        ConfigChange::Unchanged(to.clone())
    );
    assert_eq!(conf.uninstall().unwrap(), vec![to.clone()]);
    assert_eq!(plugins(&to), vec![list["plugins"][0].clone()]);
}

#[test]
fn chooses_the_first_file_that_loads() {
    let (dir, conf) = conf_dir(&[
        ("20-later.conflist", CALICO),
        ("10-containerd-net.conflist", BRIDGE),
        ("05-broken.conflist", "{\"plugins\": ["),
        (
            "06-no-type.conflist",
            r#"{"name": "x", "plugins": [{"name": "y"}]}"#,
        ),
        (
            "07-only-ours.conflist",
            r#"{"name": "x", "plugins": [{"type": "ambit-cni"}]}"#,
        ),
        ("00-notes.txt", "not a network"),
        (".ambit-cni-left.tmp", BRIDGE),
        (".ambit-cni-left.conflist", BRIDGE),
        ("99-single.conf", SINGLE),
    ]);
    let chosen = dir.path().join("10-containerd-net.conflist");
    assert_eq!(
        conf.install(&entry()).unwrap(),
        ConfigChange::Inserted(chosen)
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("20-later.conflist")).unwrap(),
        CALICO
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("99-single.conf")).unwrap(),
        SINGLE
    );
}

#[test]
fn an_empty_directory_has_no_network() {
    let (_dir, conf) = conf_dir(&[("00-notes.txt", "x")]);
    let error = conf.install(&entry()).unwrap_err();
    assert!(
        matches!(error, CniInstallError::NoNetwork { .. }),
        "{error}"
    );
}

#[test]
fn a_second_install_writes_nothing() {
    let (dir, conf) = conf_dir(&[("10-calico.conflist", CALICO)]);
    let path = dir.path().join("10-calico.conflist");
    conf.install(&entry()).unwrap();
    let before = fs::metadata(&path).unwrap();

    assert_eq!(
        conf.install(&entry()).unwrap(),
        ConfigChange::Unchanged(path.clone())
    );
    let after = fs::metadata(&path).unwrap();
    // A rewrite renames a new file over the old one: another inode.
    assert_eq!(before.ino(), after.ino());
    assert_eq!(before.modified().unwrap(), after.modified().unwrap());
}

#[test]
fn a_stale_entry_is_replaced_by_one_at_the_end() {
    let mut stale = original_plugins(CALICO);
    stale.insert(1, json!({"type": "ambit-cni", "agentSocket": "/old.sock"}));
    stale.push(json!({"type": "ambit-cni", "agentSocket": "/older.sock"}));
    let text = serde_json::to_string_pretty(&json!({"name": "k8s", "plugins": stale})).unwrap();
    let (dir, conf) = conf_dir(&[("10-calico.conflist", &text)]);
    let path = dir.path().join("10-calico.conflist");

    assert_eq!(
        conf.install(&entry()).unwrap(),
        ConfigChange::Inserted(path.clone())
    );
    let mut expected = original_plugins(CALICO);
    expected.push(entry_json());
    assert_eq!(plugins(&path), expected);

    // Last, but with other settings: replaced too.
    let moved = PluginEntry {
        agent_socket: "/run/ambit/cni.sock".into(),
        ..entry()
    };
    assert_eq!(
        conf.install(&moved).unwrap(),
        ConfigChange::Inserted(path.clone())
    );
    let written = plugins(&path);
    assert_eq!(
        written.iter().filter(|p| p["type"] == "ambit-cni").count(),
        1
    );
    assert_eq!(
        written.last().unwrap()["agentSocket"],
        "/run/ambit/cni.sock"
    );
}

#[test]
fn uninstall_restores_the_original_file() {
    let (dir, conf) = conf_dir(&[
        ("10-containerd-net.conflist", BRIDGE),
        ("20-calico.conflist", CALICO),
    ]);
    let bridge = dir.path().join("10-containerd-net.conflist");
    conf.install(&entry()).unwrap();

    assert_eq!(conf.uninstall().unwrap(), vec![bridge.clone()]);
    assert_eq!(fs::read_to_string(&bridge).unwrap(), BRIDGE);
    let inode = fs::metadata(&bridge).unwrap().ino();
    assert_eq!(conf.uninstall().unwrap(), Vec::<PathBuf>::new());
    assert_eq!(fs::metadata(&bridge).unwrap().ino(), inode);
}

#[test]
fn kubeconfig_is_copied_for_root_alone_and_removed() {
    let (dir, conf) = conf_dir(&[("kubeconfig.source", "apiVersion: v1\n")]);
    let source = KubeconfigSource::File(dir.path().join("kubeconfig.source"));
    assert!(conf.install_kubeconfig(&source).unwrap());
    assert!(!conf.install_kubeconfig(&source).unwrap());
    let installed = fs::metadata(conf.kubeconfig_path()).unwrap();
    assert_eq!(installed.permissions().mode() & 0o777, 0o600);
    assert!(conf.remove_kubeconfig().unwrap());
    assert!(!conf.remove_kubeconfig().unwrap());
}

#[test]
fn the_binary_is_copied_only_when_it_differs() {
    let source_dir = tempfile::tempdir().unwrap();
    let source = source_dir.path().join("ambit-cni");
    fs::write(&source, b"\x7fELF first").unwrap();
    let bin = tempfile::tempdir().unwrap();
    let bin_dir = CniBinDir::new(bin.path());
    let installed = bin.path().join("ambit-cni");

    assert!(bin_dir.install_plugin(&source).unwrap());
    assert_eq!(fs::read(&installed).unwrap(), b"\x7fELF first");
    assert_eq!(
        fs::metadata(&installed).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    let inode = fs::metadata(&installed).unwrap().ino();

    assert!(!bin_dir.install_plugin(&source).unwrap());
    assert_eq!(fs::metadata(&installed).unwrap().ino(), inode);

    fs::write(&source, b"\x7fELF second").unwrap();
    assert!(bin_dir.install_plugin(&source).unwrap());
    assert_eq!(fs::read(&installed).unwrap(), b"\x7fELF second");

    assert!(bin_dir.remove_plugin().unwrap());
    assert!(!bin_dir.remove_plugin().unwrap());
}

#[tokio::test]
async fn watch_puts_the_entry_back_after_the_primary_cni_rewrites_its_file() {
    let (_bin, bin_dir) = bin_dir_with_plugin();
    let (dir, conf) = conf_dir(&[("10-calico.conflist", CALICO)]);
    let path = dir.path().join("10-calico.conflist");
    let (trigger, watcher) = crate::drain::channel();
    let watch = tokio::spawn(conf.clone().watch(
        entry(),
        bin_dir,
        None,
        Duration::from_millis(10),
        watcher,
    ));

    wait_for_entry(&conf).await;
    // Calico's installer writes its configuration afresh.
    fs::write(&path, CALICO).unwrap();
    wait_for_entry(&conf).await;
    assert_eq!(plugins(&path).last().unwrap(), &entry_json());

    tokio::time::timeout(Duration::from_secs(5), trigger.drain())
        .await
        .unwrap();
    watch.await.unwrap();
}

/// A bin dir with the plugin installed, as the watch finds it after the first install.
fn bin_dir_with_plugin() -> (TempDir, CniBinDir) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("ambit-cni"), b"\x7fELF").unwrap();
    let bin_dir = CniBinDir::new(dir.path());
    (dir, bin_dir)
}

#[tokio::test]
async fn watch_stops_putting_the_entry_back_once_uninstalled() {
    let (account, source) = service_account("token");
    let (dir, conf) = conf_dir(&[("10-calico.conflist", CALICO)]);
    let (_bin, bin_dir) = bin_dir_with_plugin();
    let (trigger, watcher) = crate::drain::channel();
    let watch = tokio::spawn(conf.clone().watch(
        entry(),
        bin_dir.clone(),
        Some(source),
        Duration::from_millis(10),
        watcher,
    ));
    wait_for_entry(&conf).await;

    // What `ambit cni uninstall` does, under the lock.
    {
        let _lock = conf.lock().unwrap();
        conf.uninstall().unwrap();
        conf.remove_kubeconfig().unwrap();
        bin_dir.remove_plugin().unwrap();
    }
    // The token rotates, the primary CNI rewrites its file: nothing of ours comes back.
    fs::write(account.path().join("token"), "rotated").unwrap();
    fs::write(dir.path().join("10-calico.conflist"), CALICO).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!conf.has_plugin().unwrap());
    assert!(!conf.kubeconfig_path().exists());

    tokio::time::timeout(Duration::from_secs(5), trigger.drain())
        .await
        .unwrap();
    watch.await.unwrap();
}

/// A stand-in for /var/run/secrets/kubernetes.io/serviceaccount.
fn service_account(token: &str) -> (TempDir, KubeconfigSource) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("ca.crt"), CA_PEM).unwrap();
    fs::write(dir.path().join("token"), token).unwrap();
    let source = KubeconfigSource::ServiceAccount {
        server: ApiServerUrl::new("10.96.0.1", "443").unwrap(),
        dir: dir.path().to_owned(),
    };
    (dir, source)
}

const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

/// The server, CA and token of the kubeconfig's current context, read the way the plugin and
/// kubectl read it.
fn kubeconfig_credentials(path: &Path) -> (String, Vec<u8>, String) {
    use base64::Engine;
    let config: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    let current = config["current-context"].as_str().unwrap();
    let named = |list: &str, name: &str| {
        config[list]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|item| item["name"].as_str() == Some(name))
            .unwrap()
            .clone()
    };
    let context = named("contexts", current)["context"].clone();
    let cluster = named("clusters", context["cluster"].as_str().unwrap())["cluster"].clone();
    let user = named("users", context["user"].as_str().unwrap())["user"].clone();
    let ca = base64::engine::general_purpose::STANDARD
        .decode(cluster["certificate-authority-data"].as_str().unwrap())
        .unwrap();
    (
        cluster["server"].as_str().unwrap().to_owned(),
        ca,
        user["token"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn a_kubeconfig_is_written_from_the_service_account_for_root_alone() {
    let (_account, source) = service_account("eyJhbGciOi.first\n");
    let (_dir, conf) = conf_dir(&[]);
    assert!(conf.install_kubeconfig(&source).unwrap());
    let path = conf.kubeconfig_path();
    assert_eq!(
        kubeconfig_credentials(&path),
        (
            "https://10.96.0.1:443".to_owned(),
            CA_PEM.as_bytes().to_vec(),
            "eyJhbGciOi.first".to_owned()
        )
    );
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The same token again: nothing written.
    let inode = fs::metadata(&path).unwrap().ino();
    assert!(!conf.install_kubeconfig(&source).unwrap());
    assert_eq!(fs::metadata(&path).unwrap().ino(), inode);
}

#[test]
fn a_token_that_would_change_the_kubeconfig_stays_a_string() {
    let token = "x\ncurrent-context: other\n  users: []";
    let (_account, source) = service_account(token);
    let (_dir, conf) = conf_dir(&[]);
    conf.install_kubeconfig(&source).unwrap();
    let (_, _, written) = kubeconfig_credentials(&conf.kubeconfig_path());
    assert_eq!(written, token);
}

#[test]
fn an_empty_or_missing_token_is_refused() {
    let (account, source) = service_account(" \n");
    let (_dir, conf) = conf_dir(&[]);
    assert!(matches!(
        conf.install_kubeconfig(&source),
        Err(CniInstallError::ServiceAccountToken {
            reason: "empty",
            ..
        })
    ));
    fs::remove_file(account.path().join("token")).unwrap();
    assert!(matches!(
        conf.install_kubeconfig(&source),
        Err(CniInstallError::ReadFile { .. })
    ));
    assert!(!conf.kubeconfig_path().exists());
}

#[test]
fn the_api_server_url_brackets_ipv6_hosts() {
    let url = |host, port| ApiServerUrl::new(host, port).map(|url| url.to_string());
    assert_eq!(url("10.96.0.1", "443").unwrap(), "https://10.96.0.1:443");
    assert_eq!(
        url("fd00:10:96::1", "443").unwrap(),
        "https://[fd00:10:96::1]:443"
    );
    assert_eq!(url("[fd00::1]", "6443").unwrap(), "https://[fd00::1]:6443");
    assert_eq!(
        url("kubernetes.default.svc", "443").unwrap(),
        "https://kubernetes.default.svc:443"
    );
    for host in ["", "10.96.0.1/evil", "[10.96.0.1]", "a b", "-x.example"] {
        assert!(
            matches!(
                ApiServerUrl::new(host, "443"),
                Err(CniInstallError::ApiServerHost { .. })
            ),
            "{host:?}"
        );
    }
    for port in ["", "0", "65536", "https"] {
        assert!(
            matches!(
                ApiServerUrl::new("10.96.0.1", port),
                Err(CniInstallError::ApiServerPort { .. })
            ),
            "{port:?}"
        );
    }
}

#[tokio::test]
async fn watch_rewrites_the_kubeconfig_when_the_token_rotates() {
    let (account, source) = service_account("first");
    let (dir, conf) = conf_dir(&[("10-calico.conflist", CALICO)]);
    conf.install_kubeconfig(&source).unwrap();
    let (trigger, watcher) = crate::drain::channel();
    let (_bin, bin_dir) = bin_dir_with_plugin();
    let watch = tokio::spawn(conf.clone().watch(
        entry(),
        bin_dir,
        Some(source),
        Duration::from_millis(10),
        watcher,
    ));

    // The kubelet swaps the projected volume's files in one rename.
    let rotated = account.path().join("..token.new");
    fs::write(&rotated, "second").unwrap();
    fs::rename(&rotated, account.path().join("token")).unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while kubeconfig_credentials(&conf.kubeconfig_path()).2 != "second" {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    waited.await.unwrap();
    assert_eq!(
        plugins(&dir.path().join("10-calico.conflist"))
            .last()
            .unwrap(),
        &entry_json()
    );

    tokio::time::timeout(Duration::from_secs(5), trigger.drain())
        .await
        .unwrap();
    watch.await.unwrap();
}

async fn wait_for_entry(conf: &CniConfDir) {
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while !conf.has_plugin().unwrap() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    waited.await.unwrap();
}

#[test]
fn a_plugin_without_a_type_is_reported_by_its_index() {
    let text = r#"{"name": "x", "plugins": [{"type": "bridge"}, {"name": "y"}]}"#;
    let error = NetworkConfig::parse(text, FileKind::List).unwrap_err();
    assert_eq!(error.to_string(), "plugin 1 has no \"type\"");
}

#[test]
fn unknown_members_and_their_order_survive_a_round_trip() {
    let text = r#"{"zeta": 1, "plugins": [{"type": "b", "z": 1, "a": 2}], "alpha": [1, 2]}"#;
    let config = NetworkConfig::parse(text, FileKind::List).unwrap();
    let inserted = config
        .with_plugin(&json!({"type": "ambit-cni"}))
        .unwrap()
        .unwrap();
    assert_eq!(
        inserted,
        "{\n  \"zeta\": 1,\n  \"plugins\": [\n    {\"type\": \"b\", \"z\": 1, \"a\": 2},\n    {\n      \"type\": \"ambit-cni\"\n    }\n  ],\n  \"alpha\": [1, 2]\n}\n"
    );
    let config = NetworkConfig::parse(&inserted, FileKind::List).unwrap();
    let removed = config.without_plugin().unwrap().unwrap();
    assert_eq!(
        removed,
        "{\n  \"zeta\": 1,\n  \"plugins\": [\n    {\"type\": \"b\", \"z\": 1, \"a\": 2}\n  ],\n  \"alpha\": [1, 2]\n}\n"
    );
}
