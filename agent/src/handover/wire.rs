//! The hand-over protocol on the wire: JSON messages over a Unix `SOCK_SEQPACKET` socket, one
//! message per packet, with the descriptors a message carries attached to it (`SCM_RIGHTS`).
//!
//! Versioned by [`PROTOCOL`]. Whatever the version, an agent understands [`Message::Hello`],
//! answers a version or a setup it cannot take over from with [`Message::Refused`], and obeys
//! [`Message::Stop`] with [`Message::Released`]: so that an agent of any version can replace any
//! other, cleanly if not seamlessly.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, sockopt,
};
use serde::{Deserialize, Serialize};

use crate::sandboxes::Sandbox;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The version of the messages below; an agent takes over only from one that speaks its own.
pub(crate) const PROTOCOL: u32 = 1;

/// The largest message: a pod's is a few hundred bytes, the rest less.
const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// The most descriptors one message carries: a pod's six.
pub(crate) const MAX_DESCRIPTORS: usize = 8;

/// The most descriptors the kernel passes in one message (`SCM_MAX_FD`): room is made for all of
/// them, so that none is ever cut off, unowned and leaked, by a message that carries too many.
const SCM_MAX_FD: usize = 253;

/// What the agents say to each other. The running agent is the *predecessor*, the one taking
/// over the *successor*.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Unknown fields are ignored, so that a later version may add some to the stable messages.
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Message {
    /// Successor: who it is, and what it would take over with.
    Hello {
        protocol: u32,
        capture: String,
        pid: u32,
    },
    /// Predecessor: it will not hand over, and why.
    Refused { reason: String, pid: u32 },
    /// Predecessor: what follows; carries the node's listeners, named by `listeners` in order.
    Offer {
        pid: u32,
        pods: u32,
        /// How many [`Message::Sandbox`] follow the pods.
        #[serde(default)]
        sandboxes: u32,
        listeners: Vec<NodeListener>,
    },
    /// Predecessor, `pods` times: one pod; carries its namespace and its listeners, in the order
    /// of [`POD_DESCRIPTORS`].
    Pod { uid: String, ip: IpAddr },
    /// Predecessor, `sandboxes` times: a pod sandbox the CNI plugin reported, which the
    /// successor needs to enrol pods whose containers have not started, or `None` for one the
    /// runtime tore down (the pod is kept from enrolment).
    Sandbox {
        uid: String,
        sandbox: Option<Sandbox>,
    },
    /// Successor: it accepts on everything it was given; the predecessor stops accepting.
    TakenOver,
    /// Successor: stop accepting and release every listener, without handing them over.
    Stop,
    /// Predecessor: it no longer accepts on any listener, and closes them as its drain starts
    /// (the successor waits for their ports).
    Released,
    /// Predecessor, every second after it was taken over or stopped: the sockets it still
    /// carries, and how long until it closes them.
    Draining {
        open_sockets: u64,
        deadline_seconds: u64,
    },
}

/// The descriptors of a [`Message::Pod`], in order.
pub(crate) const POD_DESCRIPTORS: [&str; 6] = [
    "netns",
    "outbound",
    "inbound_plaintext",
    "hbone",
    "dns_udp",
    "dns_tcp",
];

/// The sockets among them: all but the namespace.
pub(crate) const POD_SOCKETS: usize = POD_DESCRIPTORS.len() - 1;

/// A node-level listener that an [`Message::Offer`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum NodeListener {
    Readiness,
    Metrics,
    Admin,
    /// The CNI plugin's socket.
    Cni,
    /// The hand-over socket itself: the next agent finds the successor there.
    Handover,
}

/// Why the conversation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    #[error("failed to reach the hand-over socket")]
    Io(#[from] io::Error),
    #[error("the other agent closed the hand-over connection")]
    Closed,
    #[error("the running agent is busy: it has as many connections waiting as it takes")]
    Busy,
    #[error("the other agent did not answer in time")]
    TimedOut,
    #[error("a hand-over message is too long or carries too many descriptors")]
    Truncated,
    #[error("a hand-over message is not one of protocol {PROTOCOL}: {0}")]
    Malformed(String),
    #[error("the other end of the hand-over socket runs as uid {0}, not as this agent")]
    Stranger(u32),
}

impl WireError {
    /// Whether nothing listens at the path (no agent runs, or it left its socket behind).
    pub(crate) fn is_absent(&self) -> bool {
        matches!(self, Self::Io(error) if matches!(
            error.raw_os_error(),
            Some(code) if code == Errno::ENOENT as i32 || code == Errno::ECONNREFUSED as i32
        ))
    }
}

/// One end of a hand-over connection.
#[derive(Debug)]
pub(crate) struct Channel(AsyncFd<OwnedFd>);

/// A listening hand-over socket.
#[derive(Debug)]
pub(crate) struct Listener(AsyncFd<OwnedFd>);

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Registers `fd` with the runtime.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    #[expect(
        unsafe_code,
        reason = "tokio registers a descriptor only through an unsafe function"
    )]
    // SAFETY: the `AsyncFd` owns the descriptor: it stays open while registered, and nothing
    // else can close it.
    let registered = unsafe { AsyncFd::register(fd) };
    registered.map_err(Into::into)
}

impl Listener {
    /// Listens at `path`, which must not exist: the caller removes a socket nothing answers on.
    pub(crate) fn bind(path: &Path) -> io::Result<Self> {
        let fd = seqpacket()?;
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        // Only its owner may connect (the peer's user is checked as well).
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        socket::listen(&fd, socket::Backlog::new(4)?)?;
        Self::from_fd(fd)
    }

    /// A listening socket received from the predecessor (or just bound).
    pub(crate) fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let kind = socket::getsockopt(&fd, sockopt::SockType)?;
        let listening = socket::getsockopt(&fd, sockopt::AcceptConn)?;
        if kind != SockType::SeqPacket || !listening {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a listening SOCK_SEQPACKET socket",
            ));
        }
        socket2::SockRef::from(&fd).set_nonblocking(true)?;
        Ok(Self(register(fd)?))
    }

    /// The next connection from an agent of this node's user; strangers are turned away.
    pub(crate) async fn accept(&self) -> Result<Channel, WireError> {
        let fd = self
            .0
            .async_io(Interest::READABLE, |fd| {
                let raw = socket::accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )?;
                #[expect(unsafe_code, reason = "accept4 returns the descriptor as an integer")]
                // SAFETY: accept4 succeeded, so `raw` is a new descriptor that nothing else owns.
                Ok(unsafe { OwnedFd::from_raw_fd(raw) })
            })
            .await?;
        Channel::checked(fd)
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }
}

impl Channel {
    /// Connects to the agent listening at `path`.
    pub(crate) fn connect(path: &Path) -> Result<Self, WireError> {
        let fd = seqpacket()?;
        match socket::connect(
            fd.as_raw_fd(),
            &UnixAddr::new(path).map_err(io::Error::from)?,
        ) {
            // A Unix socket connects at once, or not at all (EAGAIN: its queue is full).
            Ok(()) => Self::checked(fd),
            Err(Errno::EAGAIN) => Err(WireError::Busy),
            Err(error) => Err(io::Error::from(error).into()),
        }
    }

    /// Only an agent running as this one may hand over or take over: the descriptors give
    /// whoever holds them every pod's traffic.
    fn checked(fd: OwnedFd) -> Result<Self, WireError> {
        let peer = socket::getsockopt(&fd, sockopt::PeerCredentials).map_err(io::Error::from)?;
        let own = nix::unistd::geteuid().as_raw();
        if peer.uid() != own {
            return Err(WireError::Stranger(peer.uid()));
        }
        Ok(Self(register(fd)?))
    }

    /// Sends `message` with `descriptors` attached.
    pub(crate) async fn send(
        &self,
        message: &Message,
        descriptors: &[BorrowedFd<'_>],
    ) -> Result<(), WireError> {
        let bytes = serde_json::to_vec(message).map_err(|e| WireError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_MESSAGE_BYTES || descriptors.len() > MAX_DESCRIPTORS {
            return Err(WireError::Truncated);
        }
        let raw: Vec<RawFd> = descriptors.iter().map(AsRawFd::as_raw_fd).collect();
        let control = [ControlMessage::ScmRights(&raw)];
        let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &control };
        self.0
            .async_io(Interest::WRITABLE, |fd| {
                socket::sendmsg::<()>(
                    fd.as_raw_fd(),
                    &[IoSlice::new(&bytes)],
                    control,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            })
            .await?;
        Ok(())
    }

    /// [`receive`](Self::receive), given up after `limit`.
    pub(crate) async fn receive_within(
        &self,
        limit: Duration,
    ) -> Result<(Message, Vec<OwnedFd>), WireError> {
        tokio::time::timeout(limit, self.receive())
            .await
            .unwrap_or(Err(WireError::TimedOut))
    }

    /// The next message and the descriptors that came with it.
    pub(crate) async fn receive(&self) -> Result<(Message, Vec<OwnedFd>), WireError> {
        let mut buffer = vec![0; MAX_MESSAGE_BYTES];
        let (length, descriptors, truncated) = self
            .0
            .async_io(Interest::READABLE, |fd| {
                let mut control = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
                let mut iov = [IoSliceMut::new(&mut buffer)];
                let message = socket::recvmsg::<()>(
                    fd.as_raw_fd(),
                    &mut iov,
                    Some(&mut control),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )?;
                let mut descriptors = Vec::new();
                for control in message.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(received) = control {
                        #[expect(unsafe_code, reason = "SCM_RIGHTS gives descriptors as integers")]
                        // SAFETY: the kernel installed each of these descriptors in this
                        // process for this message; nothing else owns them.
                        descriptors.extend(
                            received
                                .into_iter()
                                .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) }),
                        );
                    }
                }
                let truncated = message
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                Ok((message.bytes, descriptors, truncated))
            })
            .await?;
        if truncated || descriptors.len() > MAX_DESCRIPTORS {
            return Err(WireError::Truncated);
        }
        if length == 0 {
            return Err(WireError::Closed);
        }
        let message = serde_json::from_slice(&buffer[..length])
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        Ok((message, descriptors))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    /// A connected pair: a bare socket to write anything on, and a channel.
    fn raw_pair() -> (OwnedFd, Channel) {
        let (raw, channel) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        (raw, Channel::checked(channel).unwrap())
    }

    fn pair() -> (Channel, Channel) {
        let (raw, channel) = raw_pair();
        (Channel::checked(raw).unwrap(), channel)
    }

    #[tokio::test]
    async fn a_message_arrives_with_its_descriptors() {
        let (predecessor, successor) = pair();
        let file = tempfile::tempfile().unwrap();
        let message = Message::Pod {
            uid: "uid-1".to_owned(),
            ip: "10.0.0.7".parse().unwrap(),
        };
        predecessor.send(&message, &[file.as_fd()]).await.unwrap();
        let (received, descriptors) = successor.receive().await.unwrap();
        assert_eq!(received, message);
        assert_eq!(descriptors.len(), 1);
        let (sent, got) = (
            file.metadata().unwrap(),
            std::fs::File::from(descriptors.into_iter().next().unwrap())
                .metadata()
                .unwrap(),
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!((sent.dev(), sent.ino()), (got.dev(), got.ino()));
    }

    #[tokio::test]
    async fn what_is_not_a_message_is_refused_and_a_close_is_seen() {
        let (raw, successor) = raw_pair();
        for garbage in [&b"{\"type\":\"take_everything\"}"[..], b"\xff\x00", b"{}"] {
            nix::unistd::write(&raw, garbage).unwrap();
            assert!(matches!(
                successor.receive().await,
                Err(WireError::Malformed(_))
            ));
        }
        drop(raw);
        assert!(matches!(successor.receive().await, Err(WireError::Closed)));
    }

    #[tokio::test]
    async fn a_message_past_the_limit_is_refused_not_cut() {
        let (raw, successor) = raw_pair();
        nix::unistd::write(&raw, &vec![b' '; MAX_MESSAGE_BYTES + 1]).unwrap();
        assert!(matches!(
            successor.receive().await,
            Err(WireError::Truncated)
        ));
    }

    #[test]
    fn the_stable_messages_keep_their_spelling() {
        // What agents of every version exchange, whatever else changes.
        let hello = Message::Hello {
            protocol: 1,
            capture: "ebpf".to_owned(),
            pid: 7,
        };
        assert_eq!(
            serde_json::to_string(&hello).unwrap(),
            r#"{"type":"hello","protocol":1,"capture":"ebpf","pid":7}"#
        );
        for (message, text) in [
            (Message::Stop, r#"{"type":"stop"}"#),
            (Message::Released, r#"{"type":"released"}"#),
            (
                Message::Refused {
                    reason: "r".to_owned(),
                    pid: 7,
                },
                r#"{"type":"refused","reason":"r","pid":7}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&message).unwrap(), text);
        }
    }
}
