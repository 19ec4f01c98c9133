//! Keeps a captured pod's new interfaces captured: a thread per pod, in the pod's namespace,
//! listens to link notifications (rtnetlink, `RTMGRP_LINK`) and hands every interface that
//! appears to the inbound program, as enabling did for those that existed then. Without it, an
//! interface added later (a secondary network, a veth moved in) would carry inbound TCP past
//! the program.
//!
//! The watcher does not parse notifications: any of them means "the links changed", and the
//! interfaces are listed again. So it cannot be confused by a message it does not understand,
//! nor miss a link when the socket overflows and notifications are lost.
//!
//! It stops when its [`Watcher`] is dropped (with the pod's capture): the thread waits on the
//! read end of a pipe whose write end the handle holds.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::thread;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};

use super::Pods;
use crate::capture::CaptureError;
use crate::netns::NetnsId;

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
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(CaptureError::SubscribeToLinks)?;
        bind(socket.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK))
            .map_err(CaptureError::SubscribeToLinks)?;
        Ok(Self(socket))
    }
}

/// A pod's link watcher; dropping it stops the thread, which attaches nothing after that.
#[derive(Debug)]
pub(super) struct Watcher {
    _stop: OwnedFd,
}

impl Watcher {
    /// Starts watching for the pod whose capture `pods` holds under `netns` with `generation`.
    /// Call from the pod's namespace thread: the watcher's thread inherits its namespace, where
    /// it attaches programs and writes sysctls.
    pub(super) fn start(
        subscription: Subscription,
        pods: Pods,
        netns: NetnsId,
        generation: u64,
    ) -> Result<Self, CaptureError> {
        let (stopped, stop) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| CaptureError::StartLinkWatcher(e.into()))?;
        thread::Builder::new()
            .name(format!("links-{}", netns.inode()))
            .spawn(move || watch(&subscription, &stopped, &pods, netns, generation))
            .map_err(CaptureError::StartLinkWatcher)?;
        Ok(Self { _stop: stop })
    }
}

/// Captures the pod's new interfaces each time its links change, until the watcher is dropped.
fn watch(
    subscription: &Subscription,
    stopped: &OwnedFd,
    pods: &Pods,
    netns: NetnsId,
    generation: u64,
) {
    let mut buffer = vec![0; 32 * 1024];
    loop {
        match wait(subscription, stopped) {
            Ok(Wake::Stop) => return,
            Ok(Wake::Links) => {}
            Err(error) => {
                tracing::error!(%netns, %error, "stopped watching the pod's interfaces: new ones will not be captured");
                return;
            }
        }
        if let Err(error) = drain(subscription, &mut buffer) {
            tracing::error!(%netns, %error, "stopped watching the pod's interfaces: new ones will not be captured");
            return;
        }
        // Under the lock, and only while this watcher's capture is the pod's: a capture that
        // replaced it attaches its own program, which must not be overwritten with this one.
        let mut pods = super::lock(pods);
        if let Some(pod) = pods.get_mut(&netns)
            && pod.generation == generation
        {
            pod.capture_new_interfaces(netns);
        }
    }
}

enum Wake {
    /// The links changed.
    Links,
    /// The watcher was dropped.
    Stop,
}

fn wait(subscription: &Subscription, stopped: &OwnedFd) -> io::Result<Wake> {
    loop {
        let mut fds = [
            PollFd::new(subscription.0.as_fd(), PollFlags::POLLIN),
            PollFd::new(stopped.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Err(Errno::EINTR) => continue,
            Err(error) => return Err(error.into()),
            Ok(_) => {}
        }
        // The write end closed: POLLHUP, whether asked for or not.
        if fds[1].revents().is_some_and(|events| !events.is_empty()) {
            return Ok(Wake::Stop);
        }
        if fds[0].revents().is_some_and(|events| !events.is_empty()) {
            return Ok(Wake::Links);
        }
    }
}

/// Reads every queued notification, to wait for the next ones. An overrun (`ENOBUFS`: some
/// were lost) is no error: the interfaces are listed again anyway.
fn drain(subscription: &Subscription, buffer: &mut [u8]) -> io::Result<()> {
    loop {
        match recv(subscription.0.as_raw_fd(), buffer, MsgFlags::MSG_DONTWAIT) {
            Ok(_) | Err(Errno::ENOBUFS | Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Ok(()),
            Err(error) => return Err(error.into()),
        }
    }
}
