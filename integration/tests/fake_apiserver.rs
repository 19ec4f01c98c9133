//! The fake API server as the agent uses it: through kube-rs clients, watchers and reflectors.
//! Needs no root: each test runs its own server process on a free loopback port.

use std::fs::{self, File};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures_util::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::api::events::v1::Event as EventV1;
use kube::api::{
    ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use tokio::sync::mpsc;

/// Long enough never to fail a correct server; only there so that a broken one cannot hang.
const PATIENCE: Duration = Duration::from_secs(10);

const TOKENS: &str = "
- token: client-token
  username: system:serviceaccount:shop:client
  uid: '1111'
  groups: [system:serviceaccounts]
  audiences: [istio-ca]
";

const SHOP: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

const POLICY_CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: authorizationpolicies.security.istio.io}
spec: {group: security.istio.io, names: {kind: AuthorizationPolicy, plural: authorizationpolicies}, scope: Namespaced}
";

const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: shop}
spec: {action: ALLOW}
";

fn pod(name: &str, node: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c, image: i}}]}}\n"
    )
}

fn objects(documents: &[&str]) -> String {
    documents
        .iter()
        .map(|d| format!("---\n{d}"))
        .collect::<String>()
}

/// A fake API server process, killed when dropped.
struct FakeServer {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl FakeServer {
    fn start(objects: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("a temporary directory")?;
        fs::write(dir.path().join("objects.yaml"), objects)?;
        fs::write(dir.path().join("tokens.yaml"), TOKENS)?;
        let child = spawn(dir.path(), 0)?;
        let mut server = Self {
            child,
            dir,
            port: 0,
        };
        server.port = server.wait_ready()?;
        Ok(server)
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Kills the server and starts it again on the same port with the same files.
    fn restart(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        fs::remove_file(self.kubeconfig())?;
        self.child = spawn(self.dir.path(), self.port)?;
        let port = self.wait_ready()?;
        ensure!(
            port == self.port,
            "restarted on port {port}, not {}",
            self.port
        );
        Ok(())
    }

    /// Waits for the kubeconfig, which the server writes once it listens; returns its port.
    fn wait_ready(&mut self) -> anyhow::Result<u16> {
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let log =
                    fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
                bail!("the fake API server exited with {status}:\n{log}");
            }
            if let Ok(text) = fs::read_to_string(self.kubeconfig()) {
                let port = text
                    .lines()
                    .find_map(|line| line.trim().strip_prefix("server: https://"))
                    .and_then(|address| address.rsplit_once(':'))
                    .and_then(|(_, port)| port.parse().ok())
                    .context("the kubeconfig names no server port")?;
                return Ok(port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the fake API server did not write its kubeconfig")
    }

    /// Replaces the objects file at once, as an editor that renames would.
    fn write_objects(&self, objects: &str) -> anyhow::Result<()> {
        let temporary = self.dir.path().join("objects.yaml.new");
        fs::write(&temporary, objects)?;
        fs::rename(temporary, self.dir.path().join("objects.yaml"))?;
        Ok(())
    }

    async fn config(&self) -> anyhow::Result<Config> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig())?;
        Ok(Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)
    }

    async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::try_from(self.config().await?)?)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, port: u16) -> anyhow::Result<Child> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))?;
    Command::new(env!("CARGO_BIN_EXE_fake-apiserver"))
        .arg("--objects")
        .arg(dir.join("objects.yaml"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--kubeconfig-out")
        .arg(dir.join("kubeconfig"))
        .arg("--tokens")
        .arg(dir.join("tokens.yaml"))
        .args(["--bookmark-interval-ms", "200", "--poll-interval-ms", "50"])
        .env("RUST_LOG", "debug")
        .stderr(log)
        .spawn()
        .context("starting fake-apiserver")
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(PATIENCE, future)
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

/// Polls `check` until it holds.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) -> anyhow::Result<()> {
    within(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
}

/// A reflector of the pods in `shop`, driven in the background; `Init` events (each a
/// relist) are counted on the returned channel.
fn reflect_pods(client: Client) -> (Store<Pod>, mpsc::UnboundedReceiver<()>) {
    let (reader, writer) = reflector::store();
    let (relists, relisted) = mpsc::unbounded_channel();
    let pods: Api<Pod> = Api::namespaced(client, "shop");
    let stream =
        reflector::reflector(writer, watcher(pods, watcher::Config::default())).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if matches!(event, Ok(watcher::Event::Init)) {
                // Tests that do not count relists dropped the receiver.
                let _ = relists.send(());
            }
        }
    });
    (reader, relisted)
}

fn names(store: &Store<Pod>) -> Vec<String> {
    let mut names: Vec<String> = store
        .state()
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    names
}

async fn store_has(store: &Store<Pod>, expected: &[&str]) -> anyhow::Result<()> {
    eventually(&format!("the store to hold {expected:?}"), async || {
        names(store) == expected
    })
    .await
    .with_context(|| format!("the store holds {:?}", names(store)))
}

fn api_code(result: Result<impl std::fmt::Debug, kube::Error>) -> Option<u16> {
    match result {
        Err(kube::Error::Api(status)) => Some(status.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_and_select() -> anyhow::Result<()> {
    let server = FakeServer::start(&objects(&[
        SHOP,
        &pod("a", "node1", "web"),
        &pod("b", "node2", "web"),
        &pod("c", "node1", "db"),
        &pod("d", "node2", "db"),
        &pod("e", "node1", "web"),
    ]))?;
    let client = server.client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");

    let mut seen = Vec::new();
    let mut params = ListParams::default().limit(2);
    let mut version = None;
    loop {
        let page = pods.list(&params).await?;
        ensure!(page.items.len() <= 2, "a page of {}", page.items.len());
        version.get_or_insert(page.metadata.resource_version.clone());
        ensure!(
            version == Some(page.metadata.resource_version.clone()),
            "every page has the first page's version"
        );
        seen.extend(page.items.into_iter().filter_map(|p| p.metadata.name));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    assert_eq!(seen, ["a", "b", "c", "d", "e"]);

    let select = async |params: ListParams| -> anyhow::Result<Vec<String>> {
        let list = pods.list(&params).await?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect())
    };
    assert_eq!(
        select(ListParams::default().labels("app=web")).await?,
        ["a", "b", "e"]
    );
    assert_eq!(
        select(ListParams::default().labels("app in (db),app!=web")).await?,
        ["c", "d"]
    );
    assert_eq!(
        select(ListParams::default().fields("spec.nodeName=node1")).await?,
        ["a", "c", "e"]
    );
    assert_eq!(
        select(
            ListParams::default()
                .fields("spec.nodeName!=node1")
                .labels("app=db")
        )
        .await?,
        ["d"]
    );
    assert_eq!(
        api_code(pods.list(&ListParams::default().fields("spec.foo=x")).await),
        Some(400)
    );
    assert_eq!(api_code(pods.get("nope").await), Some(404));

    let raw: serde_json::Value = client
        .request(http::Request::get("/api/v1/pods?limit=1").body(Vec::new())?)
        .await?;
    assert_eq!(raw["kind"], "PodList");
    assert_eq!(raw["items"][0]["metadata"]["name"], "a");
    assert!(
        raw["items"][0].get("kind").is_none(),
        "list items carry no kind"
    );
    assert!(raw["metadata"]["continue"].is_string());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_file_changes() -> anyhow::Result<()> {
    let server = FakeServer::start(&objects(&[
        SHOP,
        &pod("a", "node1", "web"),
        &pod("b", "node1", "web"),
    ]))?;
    let pods: Api<Pod> = Api::namespaced(server.client().await?, "shop");
    let initial = pods
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut events = pods
        .watch(&WatchParams::default().timeout(30), &initial)
        .await?
        .boxed();

    server.write_objects(&objects(&[
        SHOP,
        &pod("a", "node2", "web"),
        &pod("c", "node1", "db"),
    ]))?;
    let mut changes = Vec::new();
    while changes.len() < 3 {
        let event = within("watch events", events.next())
            .await?
            .context("the watch ended")??;
        match event {
            WatchEvent::Added(p) => {
                changes.push(format!("ADDED {}", p.metadata.name.unwrap_or_default()))
            }
            WatchEvent::Modified(p) => changes.push(format!(
                "MODIFIED {} {}",
                p.metadata.name.unwrap_or_default(),
                p.spec.and_then(|s| s.node_name).unwrap_or_default()
            )),
            WatchEvent::Deleted(p) => {
                changes.push(format!("DELETED {}", p.metadata.name.unwrap_or_default()))
            }
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => bail!("watch error: {e:?}"),
        }
    }
    changes.sort();
    assert_eq!(changes, ["ADDED c", "DELETED b", "MODIFIED a node2"]);

    let (store, _) = reflect_pods(server.client().await?);
    store_has(&store, &["a", "c"]).await?;
    server.write_objects(&objects(&[
        SHOP,
        &pod("c", "node1", "db"),
        &pod("d", "node1", "db"),
    ]))?;
    store_has(&store, &["c", "d"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_apply_to_watches() -> anyhow::Result<()> {
    let server = FakeServer::start(&objects(&[SHOP, &pod("a", "node1", "web")]))?;
    let pods: Api<Pod> = Api::namespaced(server.client().await?, "shop");
    let mut events = pods
        .watch(
            &WatchParams::default()
                .fields("spec.nodeName=node1")
                .timeout(30),
            "0",
        )
        .await?
        .boxed();
    let mut next = async || -> anyhow::Result<String> {
        loop {
            match within("a watch event", events.next())
                .await?
                .context("the watch ended")??
            {
                WatchEvent::Added(p) => {
                    return Ok(format!("ADDED {}", p.metadata.name.unwrap_or_default()));
                }
                WatchEvent::Modified(p) => {
                    return Ok(format!("MODIFIED {}", p.metadata.name.unwrap_or_default()));
                }
                WatchEvent::Deleted(p) => {
                    return Ok(format!("DELETED {}", p.metadata.name.unwrap_or_default()));
                }
                WatchEvent::Bookmark(_) => {}
                WatchEvent::Error(e) => bail!("watch error: {e:?}"),
            }
        }
    };
    assert_eq!(next().await?, "ADDED a");
    server.write_objects(&objects(&[SHOP, &pod("a", "node2", "web")]))?;
    assert_eq!(
        next().await?,
        "DELETED a",
        "a pod that leaves the selection is deleted"
    );
    server.write_objects(&objects(&[SHOP, &pod("a", "node1", "web")]))?;
    assert_eq!(
        next().await?,
        "ADDED a",
        "a pod that enters the selection is added"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_arrive() -> anyhow::Result<()> {
    let server = FakeServer::start(&objects(&[SHOP, &pod("a", "node1", "web")]))?;
    let pods: Api<Pod> = Api::namespaced(server.client().await?, "shop");
    let version = pods
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut events = pods
        .watch(&WatchParams::default().timeout(30), &version)
        .await?
        .boxed();
    match within("a bookmark", events.next())
        .await?
        .context("the watch ended")??
    {
        WatchEvent::Bookmark(bookmark) => {
            assert_eq!(bookmark.metadata.resource_version, version);
            assert_eq!(bookmark.types.kind, "Pod");
        }
        other => bail!("expected a bookmark, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_relist_after_compaction() -> anyhow::Result<()> {
    let server = FakeServer::start(&objects(&[SHOP, &pod("a", "node1", "web")]))?;
    let client = server.client().await?;
    let (store, mut relisted) = reflect_pods(client.clone());
    within("the first list", relisted.recv()).await?;
    store_has(&store, &["a"]).await?;

    // A version from before the compaction is gone for watches too.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let before = pods
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let _: serde_json::Value = client
        .request(http::Request::post("/fake/compact").body(Vec::new())?)
        .await?;
    within("a relist after the compaction", relisted.recv()).await?;
    let mut stale = pods.watch(&WatchParams::default(), &before).await?.boxed();
    match within("the stale watch", stale.next())
        .await?
        .context("the watch ended")??
    {
        WatchEvent::Error(status) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => bail!("expected 410 Gone, got {other:?}"),
    }

    server.write_objects(&objects(&[
        SHOP,
        &pod("a", "node1", "web"),
        &pod("b", "node1", "web"),
    ]))?;
    store_has(&store, &["a", "b"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_is_trusted_and_watchers_resync() -> anyhow::Result<()> {
    let mut server = FakeServer::start(&objects(&[
        SHOP,
        &pod("a", "node1", "web"),
        &pod("b", "node1", "web"),
    ]))?;
    let (store, mut relisted) = reflect_pods(server.client().await?);
    within("the first list", relisted.recv()).await?;
    store_has(&store, &["a", "b"]).await?;

    server.write_objects(&objects(&[
        SHOP,
        &pod("b", "node1", "web"),
        &pod("c", "node1", "web"),
    ]))?;
    server.restart()?;
    within("a relist after the restart", relisted.recv()).await?;
    store_has(&store, &["b", "c"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patches_survive_unrelated_file_edits() -> anyhow::Result<()> {
    let server = FakeServer::start(&objects(&[
        SHOP,
        &pod("a", "node1", "web"),
        &pod("b", "node1", "web"),
    ]))?;
    let pods: Api<Pod> = Api::namespaced(server.client().await?, "shop");
    let before = pods.get("a").await?;

    let merge = serde_json::json!({"metadata": {"annotations": {"merged": "yes"}}});
    let merged = pods
        .patch("a", &PatchParams::default(), &Patch::Merge(&merge))
        .await?;
    assert_ne!(
        merged.metadata.resource_version,
        before.metadata.resource_version
    );
    let json_patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "add", "path": "/metadata/annotations/ambient.istio.io~1redirection", "value": "enabled"}
    ]))?;
    pods.patch("a", &PatchParams::default(), &Patch::<()>::Json(json_patch))
        .await?;
    let applied = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "labels": {"applied": "yes"}}});
    pods.patch("a", &PatchParams::apply("test"), &Patch::Apply(&applied))
        .await?;
    assert_eq!(
        api_code(
            pods.patch("nope", &PatchParams::default(), &Patch::Merge(&merge))
                .await
        ),
        Some(404)
    );

    server.write_objects(&objects(&[
        SHOP,
        &pod("a", "node1", "web"),
        &pod("b", "node2", "web"),
    ]))?;
    eventually("the edit of b", async || {
        let b = pods.get("b").await.ok();
        b.and_then(|b| b.spec?.node_name).as_deref() == Some("node2")
    })
    .await?;
    let a = pods.get("a").await?;
    let annotations = a.metadata.annotations.unwrap_or_default();
    assert_eq!(annotations.get("merged").map(String::as_str), Some("yes"));
    assert_eq!(
        annotations
            .get("ambient.istio.io/redirection")
            .map(String::as_str),
        Some("enabled")
    );
    assert_eq!(
        a.metadata
            .labels
            .unwrap_or_default()
            .get("applied")
            .map(String::as_str),
        Some("yes")
    );
    assert_eq!(a.metadata.uid, before.metadata.uid);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_created_and_listed() -> anyhow::Result<()> {
    let server = FakeServer::start(&objects(&[SHOP, &pod("a", "node1", "web")]))?;
    let client = server.client().await?;
    let recorder = Recorder::new(client.clone(), "ambit".into());
    let pod = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some("a".into()),
        namespace: Some("shop".into()),
        ..ObjectReference::default()
    };
    let event = Event {
        type_: EventType::Normal,
        reason: "Captured".into(),
        note: Some("traffic is redirected".into()),
        action: "Capture".into(),
        secondary: None,
    };
    // The second publication of the same event patches its series.
    recorder.publish(&event, &pod).await?;
    recorder.publish(&event, &pod).await?;

    let events: Api<EventV1> = Api::namespaced(client, "shop");
    let listed = events.list(&ListParams::default()).await?.items;
    assert_eq!(listed.len(), 1);
    let recorded = &listed[0];
    assert_eq!(recorded.reason.as_deref(), Some("Captured"));
    assert_eq!(recorded.series.as_ref().map(|s| s.count), Some(2));

    let copy = EventV1 {
        metadata: kube::api::ObjectMeta {
            name: recorded.metadata.name.clone(),
            ..Default::default()
        },
        event_time: recorded.event_time.clone(),
        ..EventV1::default()
    };
    assert_eq!(
        api_code(events.create(&PostParams::default(), &copy).await),
        Some(409)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_security_is_served_once_its_crd_exists() -> anyhow::Result<()> {
    let server = FakeServer::start(&objects(&[SHOP, POLICY]))?;
    let client = server.client().await?;
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
    let policies: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "shop", &ApiResource::from_gvk(&gvk));
    assert_eq!(
        api_code(policies.list(&ListParams::default()).await),
        Some(404)
    );
    let groups = client.list_api_groups().await?;
    assert!(!groups.groups.iter().any(|g| g.name == "security.istio.io"));

    server.write_objects(&objects(&[SHOP, POLICY, POLICY_CRD]))?;
    eventually("the policies to be served", async || {
        policies.list(&ListParams::default()).await.is_ok()
    })
    .await?;
    let listed = policies.list(&ListParams::default()).await?;
    let names: Vec<_> = listed
        .items
        .iter()
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    assert_eq!(names, ["allow-client"]);
    let groups = client.list_api_groups().await?;
    assert!(groups.groups.iter().any(|g| g.name == "security.istio.io"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reviews_know_the_listed_tokens() -> anyhow::Result<()> {
    let server = FakeServer::start(SHOP)?;
    let reviews: Api<TokenReview> = Api::all(server.client().await?);
    let review = async |token: &str| -> anyhow::Result<_> {
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: Some(vec!["istio-ca".into()]),
            },
            ..TokenReview::default()
        };
        Ok(reviews
            .create(&PostParams::default(), &request)
            .await?
            .status
            .unwrap_or_default())
    };
    let known = review("client-token").await?;
    assert_eq!(known.authenticated, Some(true));
    let user = known.user.unwrap_or_default();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:shop:client")
    );
    assert_eq!(user.uid.as_deref(), Some("1111"));
    assert_eq!(known.audiences, Some(vec!["istio-ca".into()]));

    let unknown = review("forged").await?;
    assert_ne!(unknown.authenticated, Some(true));
    assert!(unknown.error.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_token_are_unauthorized() -> anyhow::Result<()> {
    let server = FakeServer::start(SHOP)?;
    let mut config = server.config().await?;
    config.auth_info = AuthInfo::default();
    let pods: Api<Pod> = Api::all(Client::try_from(config)?);
    assert_eq!(api_code(pods.list(&ListParams::default()).await), Some(401));
    Ok(())
}
