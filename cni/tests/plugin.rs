//! The `ambit-cni` binary run as a container runtime runs it, against a fake agent on a Unix
//! socket in a temporary directory.

#![expect(
    clippy::unwrap_used,
    reason = "a helper that cannot run the plugin or the fake agent fails the test"
)]

use std::io::{BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::thread::{self, JoinHandle};

use ambit_cni::{Command, Message, PodRef, Reply, Request};
use serde_json::{Value, json};

const ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=client;\
                    K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1111-2222";

/// A fake agent answering one connection with `reply`; joining it gives the request.
fn agent(socket: &Path, reply: Reply) -> JoinHandle<Request> {
    let listener = UnixListener::bind(socket).unwrap();
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let request = Request::read_from(&mut BufReader::new(&stream)).unwrap();
        reply.write_to(&mut &stream).unwrap();
        request
    })
}

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-42"}],
        "ips": [
            {"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0},
            {"address": "fd00:10:244:1::7/64", "interface": 0}
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

fn netconf(socket: &Path, prev_result: Option<Value>) -> Value {
    let mut netconf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "ambit-cni",
        "agentSocket": socket,
        "timeoutSeconds": 5,
    });
    if let Some(prev_result) = prev_result {
        netconf["prevResult"] = prev_result;
    }
    netconf
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the plugin with the runtime's variables and `netconf` on stdin.
fn run(command: &str, args: &str, netconf: &Value) -> Run {
    let mut child = Process::new(env!("CARGO_BIN_EXE_ambit-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", "/var/run/netns/cni-42")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A plugin that fails on its environment exits without reading stdin.
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(netconf.to_string().as_bytes());
    let output = child.wait_with_output().unwrap();
    Run {
        code: output.status.code().unwrap(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("stdout {stdout:?}: {e}"))
}

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("cni.sock")
}

#[test]
fn version() {
    let run = run("VERSION", "", &json!({"cniVersion": "1.0.0"}));
    assert_eq!(run.code, 0);
    assert_eq!(
        json_of(&run.stdout),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
}

#[test]
fn add_captured_passes_prev_result_on_and_sends_the_pod() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let agent = agent(&socket, Reply::Captured);
    let run = run("ADD", ARGS, &netconf(&socket, Some(prev_result())));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(json_of(&run.stdout), prev_result());
    assert_eq!(
        agent.join().unwrap(),
        Request {
            command: Command::Add,
            container_id: "c0ffee".to_owned(),
            netns: PathBuf::from("/var/run/netns/cni-42"),
            interface: "eth0".to_owned(),
            pod: PodRef {
                namespace: "shop".to_owned(),
                name: "client".to_owned(),
                uid: "1111-2222".to_owned(),
            },
            ips: vec![
                "10.244.1.7".parse().unwrap(),
                "fd00:10:244:1::7".parse().unwrap()
            ],
        }
    );
}

#[test]
fn add_not_in_mesh_passes_prev_result_on_in_the_configuration_version() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let agent = agent(&socket, Reply::NotInMesh);
    let mut netconf = netconf(&socket, Some(prev_result()));
    netconf["cniVersion"] = json!("1.1.0");
    let run = run("ADD", ARGS, &netconf);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let mut expected = prev_result();
    expected["cniVersion"] = json!("1.1.0");
    assert_eq!(json_of(&run.stdout), expected);
    agent.join().unwrap();
}

#[test]
fn add_failed_by_the_agent_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let agent = agent(
        &socket,
        Reply::Failed {
            error: "cannot open the pod's netns".to_owned(),
        },
    );
    let run = run("ADD", ARGS, &netconf(&socket, Some(prev_result())));
    assert_eq!(run.code, 1);
    assert_eq!(
        json_of(&run.stdout),
        json!({
            "cniVersion": "1.0.0",
            "code": 100,
            "msg": "the ambit agent could not capture the pod",
            "details": "cannot open the pod's netns",
        })
    );
    assert!(run.stderr.contains("could not capture"), "{}", run.stderr);
    agent.join().unwrap();
}

#[test]
fn add_with_the_agent_down_and_no_kubeconfig_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let run = run("ADD", ARGS, &netconf(&socket_in(&dir), Some(prev_result())));
    assert_eq!(run.code, 1);
    let error = json_of(&run.stdout);
    assert_eq!(error["code"], 11);
    assert!(
        error["msg"].as_str().unwrap().contains("not reachable"),
        "{error}"
    );
}

#[test]
fn add_outside_kubernetes_passes_prev_result_on_without_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let run = run(
        "ADD",
        "IgnoreUnknown=1",
        &netconf(&socket_in(&dir), Some(prev_result())),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(json_of(&run.stdout), prev_result());
}

#[test]
fn add_without_prev_result_is_an_invalid_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let run = run("ADD", ARGS, &netconf(&socket_in(&dir), None));
    assert_eq!(run.code, 1);
    assert_eq!(json_of(&run.stdout)["code"], 7);
}

#[test]
fn del_with_the_agent_down_succeeds_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("cni.log");
    let mut netconf = netconf(&socket_in(&dir), None);
    netconf["logFile"] = json!(log);
    let run = run("DEL", ARGS, &netconf);
    assert_eq!((run.code, run.stdout.as_str()), (0, ""));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("reconciles"), "{logged}");
}

#[test]
fn del_is_sent_to_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let agent = agent(&socket, Reply::Released);
    let run = run("DEL", ARGS, &netconf(&socket, None));
    assert_eq!((run.code, run.stdout.as_str()), (0, ""), "{}", run.stderr);
    let request = agent.join().unwrap();
    assert_eq!(request.command, Command::Del);
    assert_eq!(request.pod.uid, "1111-2222");
}

#[test]
fn check_passes_when_the_agent_confirms() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let agent = agent(&socket, Reply::Checked);
    let run = run("CHECK", ARGS, &netconf(&socket, Some(prev_result())));
    assert_eq!((run.code, run.stdout.as_str()), (0, ""), "{}", run.stderr);
    assert_eq!(agent.join().unwrap().command, Command::Check);
}

#[test]
fn check_fails_with_what_the_agent_finds_missing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let agent = agent(
        &socket,
        Reply::Failed {
            error: "no listener on 15001".to_owned(),
        },
    );
    let run = run("CHECK", ARGS, &netconf(&socket, Some(prev_result())));
    assert_eq!(run.code, 1);
    let error = json_of(&run.stdout);
    assert_eq!(
        (error["code"].as_u64(), error["details"].as_str()),
        (Some(100), Some("no listener on 15001"))
    );
    agent.join().unwrap();
}

#[test]
fn bad_input_gets_the_specified_codes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let undecodable = Process::new(env!("CARGO_BIN_EXE_ambit-cni"))
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(undecodable.status.code(), Some(1));
    assert_eq!(
        json_of(&String::from_utf8(undecodable.stdout).unwrap())["code"],
        6
    );

    let mut old = netconf(&socket, Some(prev_result()));
    old["cniVersion"] = json!("0.2.0");
    assert_eq!(json_of(&run("ADD", ARGS, &old).stdout)["code"], 1);
    assert_eq!(
        json_of(&run("UPGRADE", ARGS, &netconf(&socket, None)).stdout)["code"],
        4
    );
    assert_eq!(
        json_of(
            &run(
                "ADD",
                "K8S_POD_NAME",
                &netconf(&socket, Some(prev_result()))
            )
            .stdout
        )["code"],
        4
    );
}
