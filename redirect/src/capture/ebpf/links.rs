//! Keeps a captured pod's new interfaces captured: a task per pod listens to the link
//! notifications (rtnetlink, `RTMGRP_LINK`) of a socket opened in the pod's namespace and hands
//! every interface that appears to the inbound program, as enabling did for those that existed
//! then. Without it, an interface added later (a secondary network, a veth moved in) would carry
//! inbound TCP past the program.
//!
//! The watcher does not parse notifications: any of them means "the links changed", and the
//! interfaces are listed again. So it cannot be confused by a message it does not understand,
//! nor miss a link when the socket overflows and notifications are lost.
//!
//! It stops when its [`Watcher`] is dropped (with the pod's capture).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};
use tokio::io::unix::AsyncFd;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use super::Shared;
use crate::capture::CaptureError;
use crate::netns::Netns;

/// Link notifications of the socket's namespace.
const RTMGRP_LINK: u32 = 1;

/// A subscription to the link notifications of the calling thread's namespace. Subscribe before
/// listing the interfaces: a link added in between is then notified, not missed.
#[derive(Debug)]
pub(super) struct Subscription(OwnedFd);

impl Subscription {
    pub(super) fn new() -> Result<Self, CaptureError> {
        let socket = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )
        .map_err(CaptureError::SubscribeToLinks)?;
        bind(socket.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK))
            .map_err(CaptureError::SubscribeToLinks)?;
        Ok(Self(socket))
    }
}

/// A pod's link watcher; dropping it stops the task, which attaches nothing after that.
#[derive(Debug)]
pub(super) struct Watcher {
    task: AbortHandle,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watcher {
    /// Starts watching for the pod whose capture `shared` holds under `netns` with
    /// `generation`, on the runtime of the calling thread.
    pub(super) fn start(
        subscription: Subscription,
        shared: Arc<Shared>,
        netns: Netns,
        generation: u64,
    ) -> Result<Self, CaptureError> {
        let runtime = Handle::try_current()
            .map_err(|e| CaptureError::StartLinkWatcher(io::Error::other(e)))?;
        let _entered = runtime.enter();
        #[expect(
            unsafe_code,
            reason = "tokio registers a descriptor only through an unsafe function"
        )]
        // SAFETY: the `AsyncFd` owns the socket, an `OwnedFd`: it stays open while registered,
        // and nothing else can close it.
        let registered = unsafe { AsyncFd::register(subscription.0) };
        let subscription = registered.map_err(|e| CaptureError::StartLinkWatcher(e.into()))?;
        let task = runtime.spawn(watch(subscription, shared, Arc::new(netns), generation));
        Ok(Self {
            task: task.abort_handle(),
        })
    }
}

/// Captures the pod's new interfaces each time its links change, until the watcher is dropped.
async fn watch(
    subscription: AsyncFd<OwnedFd>,
    shared: Arc<Shared>,
    netns: Arc<Netns>,
    generation: u64,
) {
    let id = netns.id();
    loop {
        let drained = match subscription.readable().await {
            Ok(mut ready) => {
                let drained = drain(subscription.get_ref());
                ready.clear_ready();
                drained
            }
            Err(error) => Err(error),
        };
        if let Err(error) = drained {
            tracing::error!(netns = %id, %error, "stopped watching the pod's interfaces: new ones will not be captured");
            return;
        }
        let (shared, netns) = (shared.clone(), netns.clone());
        let captured = tokio::task::spawn_blocking(move || {
            netns.run_in(|| {
                // Under the lock, and only while this watcher's capture is the pod's: a capture
                // that replaced it attaches the program itself.
                let mut pods = shared.pods();
                if pods
                    .captures
                    .get(&id)
                    .is_some_and(|pod| pod.generation == generation)
                {
                    pods.capture_new_interfaces(&shared, id);
                }
            })
        })
        .await;
        match captured {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(netns = %id, error = %super::chain(&error), "failed to enter the pod's namespace to capture its new interfaces");
            }
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // The runtime is stopping.
            Err(_) => return,
        }
    }
}

/// Reads every queued notification, to wait for the next ones. An overrun (`ENOBUFS`: some
/// were lost) is no error: the interfaces are listed again anyway. Nor is a notification longer
/// than the buffer: it is not read, only discarded.
fn drain(subscription: &OwnedFd) -> io::Result<()> {
    let mut buffer = [0; 4096];
    loop {
        match recv(
            subscription.as_raw_fd(),
            &mut buffer,
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(_) | Err(Errno::ENOBUFS | Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Ok(()),
            Err(error) => return Err(error.into()),
        }
    }
}
