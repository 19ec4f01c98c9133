//! A test double of the Kubernetes API server, faithful on the wire to what kube-rs clients
//! (reflectors, watchers, `Api` writes, the events `Recorder`) rely on.
//!
//! - **Objects** come from a multi-document YAML file, polled for changes. What changed in the
//!   file since its last good version is added, modified or deleted, each with a new
//!   `resourceVersion`; objects whose file content did not change keep their live state (a
//!   patch survives an unrelated edit). A file that fails to parse is logged and ignored.
//! - **Versions** are one counter that starts at the wall clock in microseconds, so that a
//!   restarted server never serves a version a client saw before: clients get `410 Gone` and
//!   relist, as after a real watch-cache reset.
//! - **Reads**: discovery, get, list (label and field selectors, `limit`/`continue` over a
//!   consistent snapshot) and watch (replay from a bounded history, bookmarks, timeouts,
//!   `ERROR` events with `410 Expired`).
//! - **Writes**: create, patch (JSON, merge, strategic merge and apply, the last two treated
//!   as merge patches) and delete; TokenReview from a file of known tokens.
//! - **Custom resources** of `security.istio.io` are served only while the file holds their
//!   CustomResourceDefinition; until then they are `404 Not Found` and absent from discovery.
//! - **Compaction**: `POST /fake/compact` drops the history and ends every watch, so watchers
//!   re-watch, get `410 Gone` and relist.
//! - **Access**: HTTPS with a certificate signed by a CA kept in `<kubeconfig>.tls/`, and a
//!   bearer token kept there too; both are reused on restart. The kubeconfig is written
//!   atomically once the server listens, so its appearance means the server is ready.

mod discovery;
mod kubeconfig;
mod list;
mod objects_file;
mod patch;
mod query;
mod requests;
mod resources;
mod routes;
mod selectors;
mod state;
mod status;
mod store;
mod tls;
mod token_review;
mod watch;
mod writes;

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

pub use kubeconfig::KubeconfigError;
pub use objects_file::ObjectsFileError;
pub use tls::TlsError;

use state::State;
use store::{Store, Version};

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the fake serves and where.
#[derive(Debug, Clone)]
pub struct FakeApiServerConfig {
    /// The objects file, multi-document YAML.
    pub objects: PathBuf,
    /// Where to listen; port 0 picks a free port, which the kubeconfig then names.
    pub listen: SocketAddr,
    /// The kubeconfig to write once listening; the CA and token live in `<this>.tls/`.
    pub kubeconfig_out: PathBuf,
    /// The known tokens TokenReview answers from, if any.
    pub tokens: Option<PathBuf>,
    /// How many changes are kept for watches to resume from.
    pub history: usize,
    /// How often watches that allow them get a bookmark.
    pub bookmark_interval: Duration,
    /// How late watches see each change, as behind a lagging watch cache; lists and gets see it
    /// at once.
    pub watch_delay: Duration,
    /// How often the objects file is checked for changes.
    pub poll_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum FakeApiServerError {
    #[error("cannot read the objects file {}", .0.display())]
    ReadObjects(PathBuf, #[source] std::io::Error),
    #[error("the objects file {} is not valid", .0.display())]
    ParseObjects(PathBuf, #[source] ObjectsFileError),
    #[error("cannot set up TLS")]
    Tls(#[source] TlsError),
    #[error("cannot listen on {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("cannot write the kubeconfig")]
    Kubeconfig(#[source] KubeconfigError),
}

/// A listening fake API server; [`FakeApiServer::run`] serves it.
pub struct FakeApiServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    address: SocketAddr,
    objects: PathBuf,
    poll_interval: Duration,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("address", &self.address)
            .field("objects", &self.objects)
            .finish_non_exhaustive()
    }
}

impl FakeApiServer {
    /// Loads the objects, listens, and writes the kubeconfig.
    pub async fn bind(config: FakeApiServerConfig) -> Result<Self, FakeApiServerError> {
        let text = std::fs::read_to_string(&config.objects)
            .map_err(|e| FakeApiServerError::ReadObjects(config.objects.clone(), e))?;
        let objects = objects_file::parse(&text)
            .map_err(|e| FakeApiServerError::ParseObjects(config.objects.clone(), e))?;
        let credentials = tls::Credentials::load_or_create(&tls_dir(&config.kubeconfig_out))
            .map_err(FakeApiServerError::Tls)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| FakeApiServerError::Bind(config.listen, e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| FakeApiServerError::Bind(config.listen, e))?;
        // Clients cannot connect to the unspecified address; loopback reaches it.
        let address = if bound.ip().is_unspecified() {
            SocketAddr::from((Ipv4Addr::LOCALHOST, bound.port()))
        } else {
            bound
        };
        let tls = credentials
            .server_config(address.ip())
            .map_err(FakeApiServerError::Tls)?;

        let mut store = Store::new(first_version(), config.history);
        store.load_file(objects);
        let state = State::new(
            store,
            credentials.token().to_owned(),
            config.tokens,
            config.bookmark_interval,
            config.watch_delay,
            address.to_string(),
        );
        kubeconfig::write(
            &config.kubeconfig_out,
            address,
            credentials.ca_pem(),
            credentials.token(),
        )
        .map_err(FakeApiServerError::Kubeconfig)?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(tls),
            state: Arc::new(state),
            address,
            objects: config.objects,
            poll_interval: config.poll_interval,
        })
    }

    /// The address clients reach the server at, as the kubeconfig names it.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves until the task is dropped.
    pub async fn run(self) {
        tokio::spawn(watch_objects_file(
            Arc::clone(&self.state),
            self.objects,
            self.poll_interval,
        ));
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, state) = (self.acceptor.clone(), Arc::clone(&self.state));
            tokio::spawn(async move {
                if let Err(e) = serve_connection(acceptor, state, stream).await {
                    tracing::debug!(src.addr = %peer, error = %e, "connection ended");
                }
            });
        }
    }
}

async fn serve_connection(
    acceptor: TlsAcceptor,
    state: Arc<State>,
    stream: TcpStream,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await??;
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(requests::handle(state, request).await) }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await?;
    Ok(())
}

/// Polls the objects file and loads each new version that parses.
async fn watch_objects_file(state: Arc<State>, path: PathBuf, interval: Duration) {
    let mut last = std::fs::read(&path).ok();
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        let contents = match tokio::fs::read(&path).await {
            Ok(contents) => contents,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot read the objects file");
                continue;
            }
        };
        if last.as_ref() == Some(&contents) {
            continue;
        }
        let parsed = std::str::from_utf8(&contents)
            .map_err(|_| "the file is not UTF-8".to_owned())
            .and_then(|text| objects_file::parse(text).map_err(|e| requests::error_chain(&e)));
        last = Some(contents);
        match parsed {
            Ok(objects) => {
                let (changes, resource_version) = state.write(|store| {
                    let changes = store.load_file(objects);
                    (changes, store.latest())
                });
                tracing::info!(changes, resource_version, "objects file loaded");
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "objects file ignored; the last good version stays");
            }
        }
    }
}

/// Where the CA and the token live: beside the kubeconfig.
pub fn tls_dir(kubeconfig: &Path) -> PathBuf {
    let mut dir = kubeconfig.as_os_str().to_owned();
    dir.push(".tls");
    PathBuf::from(dir)
}

/// The version before the first change: the wall clock in microseconds, ahead of every
/// version an earlier run could have served unless it wrote a million times a second.
fn first_version() -> Version {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Version::try_from(now.as_micros()).unwrap_or(Version::MAX / 2)
}
