//! The plugin's side of the agent protocol: one request, one reply, within a deadline.

use std::io::{self, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::protocol::{Message, ProtocolError, Reply, Request};

/// Why the agent gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentError {
    #[error("cannot connect to the agent at {}", socket.display())]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent did not answer within {0:?}")]
    TimedOut(Duration),
    #[error("the exchange with the agent failed")]
    Exchange(#[source] ProtocolError),
}

/// Sends `request` to the agent listening on `socket` and waits at most `timeout` in all
/// for its reply.
pub(crate) fn ask(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Reply, AgentError> {
    let deadline = Instant::now() + timeout;
    // Connecting to a Unix socket does not wait for the agent to accept: it fails at once
    // when nobody listens and otherwise lands in the backlog.
    let mut stream = UnixStream::connect(socket).map_err(|source| AgentError::Unreachable {
        socket: socket.to_owned(),
        source,
    })?;
    let timed_out = |error: &ProtocolError| match error {
        ProtocolError::Read(cause) | ProtocolError::Write(cause) => matches!(
            cause.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        _ => false,
    };
    let classify = |error: ProtocolError| {
        if timed_out(&error) {
            AgentError::TimedOut(timeout)
        } else {
            AgentError::Exchange(error)
        }
    };
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|error| classify(ProtocolError::Write(error)))?;
    request.write_to(&mut stream).map_err(classify)?;
    let mut reader = BufReader::new(DeadlineReader { stream, deadline });
    Reply::read_from(&mut reader).map_err(classify)
}

/// Gives each read only the time left until the deadline, so that a reply that trickles in
/// cannot stretch the wait.
struct DeadlineReader {
    stream: UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buffer)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, Write};
    use std::os::unix::net::UnixListener;
    use std::thread;

    use super::*;
    use crate::protocol::{Command, PodRef};

    fn request() -> Request {
        Request {
            command: Command::Check,
            container_id: "c".to_owned(),
            netns: PathBuf::from("/proc/1/ns/net"),
            interface: "eth0".to_owned(),
            pod: PodRef {
                namespace: "n".to_owned(),
                name: "p".to_owned(),
                uid: "u".to_owned(),
            },
            ips: Vec::new(),
        }
    }

    #[test]
    fn nobody_listening_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let error = ask(
            &dir.path().join("none.sock"),
            &request(),
            Duration::from_secs(1),
        );
        assert!(matches!(error, Err(AgentError::Unreachable { .. })));
    }

    #[test]
    fn a_reply_that_trickles_in_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let agent = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut stream = stream;
            for _ in 0..10 {
                if stream.write_all(b" ").is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        let started = Instant::now();
        let error = ask(&socket, &request(), Duration::from_millis(300));
        assert!(matches!(error, Err(AgentError::TimedOut(_))), "{error:?}");
        assert!(started.elapsed() < Duration::from_millis(800));
        agent.join().unwrap();
    }
}
