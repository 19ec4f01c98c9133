//! Which endpoint of a Service a new connection goes to. Of two ready endpoints picked at
//! random, the one this agent has fewer connections open to (power of two choices: near the
//! least-loaded choice without scanning every endpoint, and without every agent herding onto
//! the same one). An endpoint that fails a connection is ejected, skipped for a while that
//! grows with each ejection in a row, as Envoy's outlier detection does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Ejections last at most this long, however many in a row.
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// The endpoints this agent has connections open to or has ejected, shared by every pod of the
/// node.
#[derive(Debug)]
pub(crate) struct Balancer {
    endpoints: Mutex<HashMap<SocketAddr, EndpointState>>,
    ejection: Duration,
}

#[derive(Debug, Default)]
struct EndpointState {
    /// Connections open, or being opened, to it.
    open: usize,
    /// Until when it is skipped.
    ejected_until: Option<Instant>,
    /// Ejections since it last carried a connection.
    ejections: u32,
}

impl EndpointState {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }

    /// Nothing worth keeping: no connection, and no ejection that still counts.
    fn is_idle(&self, now: Instant) -> bool {
        self.open == 0
            && self
                .ejected_until
                .is_none_or(|until| until + MAX_EJECTION <= now)
    }
}

/// A connection's claim on the endpoint chosen for it, counted as open until dropped.
#[derive(Debug)]
pub(crate) struct Lease {
    balancer: Arc<Balancer>,
    endpoint: SocketAddr,
}

/// Why an endpoint was ejected, and for how long; the source of the connection's error.
#[derive(Debug, thiserror::Error)]
#[error("endpoint {endpoint} ejected for {}s", ejected_for.as_secs())]
pub(crate) struct Ejected<E> {
    pub(crate) endpoint: SocketAddr,
    pub(crate) ejected_for: Duration,
    #[source]
    pub(crate) source: E,
}

impl Balancer {
    /// Ejections of `ejection` at first.
    pub(crate) fn new(ejection: Duration) -> Self {
        Self {
            endpoints: Mutex::default(),
            ejection,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, EndpointState>> {
        self.endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Chooses one of `candidates`, which must not be empty, and counts a connection to it.
    /// When every candidate is ejected, the choice is made among all of them: a Service whose
    /// endpoints all failed recently is better tried, spread as usual, than refused.
    pub(crate) fn choose(self: &Arc<Self>, candidates: &[SocketAddr]) -> Lease {
        let now = Instant::now();
        let mut endpoints = self.lock();
        let state = |addr: &SocketAddr| endpoints.get(addr);
        let eligible: Vec<SocketAddr> = candidates
            .iter()
            .filter(|addr| !state(addr).is_some_and(|s| s.is_ejected(now)))
            .copied()
            .collect();
        let pool = if eligible.is_empty() {
            candidates
        } else {
            &eligible
        };
        let open = |addr: &SocketAddr| state(addr).map_or(0, |s| s.open);
        let endpoint = match pool.len() {
            0 => unreachable!("a Service has endpoints to choose from"),
            1 => pool[0],
            n => {
                let first = fastrand::usize(..n);
                // Another one, uniformly among the rest.
                let second = (first + 1 + fastrand::usize(..n - 1)) % n;
                let (a, b) = (pool[first], pool[second]);
                if open(&b) < open(&a) { b } else { a }
            }
        };
        endpoints.entry(endpoint).or_default().open += 1;
        drop(endpoints);
        Lease {
            balancer: self.clone(),
            endpoint,
        }
    }

    /// The endpoints ejected now, with how long each stays so.
    pub(crate) fn ejected(&self) -> Vec<(SocketAddr, Duration)> {
        let now = Instant::now();
        let mut ejected: Vec<_> = self
            .lock()
            .iter()
            .filter_map(|(addr, s)| Some((*addr, s.ejected_until?.checked_duration_since(now)?)))
            .filter(|(_, left)| !left.is_zero())
            .collect();
        ejected.sort();
        ejected
    }
}

impl Lease {
    pub(crate) fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// The endpoint carried the connection: it is back in the choice (it was tried while all
    /// were ejected), and its next ejection starts over from the shortest.
    pub(crate) fn succeeded(&self) {
        if let Some(state) = self.balancer.lock().get_mut(&self.endpoint) {
            state.ejections = 0;
            state.ejected_until = None;
        }
    }

    /// The endpoint failed the connection with `error`: it is ejected, for longer with each
    /// ejection in a row. Failures while it is already ejected (connections that were under
    /// way, or tried because all were ejected) do not extend it. `Err` gives the error back when
    /// ejection is off.
    pub(crate) fn failed<E>(self, error: E) -> Result<Ejected<E>, E> {
        if self.balancer.ejection.is_zero() {
            return Err(error);
        }
        let now = Instant::now();
        let mut endpoints = self.balancer.lock();
        // Failures are rare: forgetting idle endpoints here bounds the table by the endpoints
        // in use or ejected recently, without a sweep on the connection path.
        endpoints.retain(|addr, s| *addr == self.endpoint || !s.is_idle(now));
        let state = endpoints.entry(self.endpoint).or_default();
        let ejected_for = match state.ejected_until {
            Some(until) if until > now => until - now,
            _ => {
                state.ejections = state.ejections.saturating_add(1);
                let ejected_for = self
                    .balancer
                    .ejection
                    .saturating_mul(state.ejections)
                    .min(MAX_EJECTION);
                state.ejected_until = Some(now + ejected_for);
                tracing::warn!(
                    endpoint = %self.endpoint,
                    ejected_for_s = ejected_for.as_secs(),
                    "endpoint ejected after a failed connection"
                );
                ejected_for
            }
        };
        drop(endpoints);
        Ok(Ejected {
            endpoint: self.endpoint,
            ejected_for,
            source: error,
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut endpoints = self.balancer.lock();
        if let Some(state) = endpoints.get_mut(&self.endpoint) {
            state.open = state.open.saturating_sub(1);
            if state.is_idle(now) && state.ejections == 0 {
                endpoints.remove(&self.endpoint);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
            .collect()
    }

    #[test]
    fn the_less_loaded_of_two_is_chosen() {
        let balancer = Arc::new(Balancer::new(Duration::from_secs(30)));
        let endpoints = addrs(2);
        // With two endpoints both are always compared: connections alternate.
        let leases: Vec<Lease> = (0..10).map(|_| balancer.choose(&endpoints)).collect();
        let on_first = leases
            .iter()
            .filter(|l| l.endpoint() == endpoints[0])
            .count();
        assert_eq!(on_first, 5);
    }

    #[test]
    fn load_spreads_over_every_endpoint() {
        let balancer = Arc::new(Balancer::new(Duration::from_secs(30)));
        let endpoints = addrs(5);
        let leases: Vec<Lease> = (0..500).map(|_| balancer.choose(&endpoints)).collect();
        for endpoint in &endpoints {
            let open = leases.iter().filter(|l| l.endpoint() == *endpoint).count();
            // Power of two choices keeps every endpoint near the mean of 100.
            assert!((80..=120).contains(&open), "{endpoint}: {open}");
        }
        drop(leases);
        assert!(
            balancer.lock().is_empty(),
            "closed connections leave nothing"
        );
    }

    #[test]
    fn an_ejected_endpoint_is_skipped_for_longer_each_time() {
        let balancer = Arc::new(Balancer::new(Duration::from_secs(30)));
        let endpoints = addrs(3);
        let lease = balancer.choose(&endpoints[..1]);
        let ejected = lease.failed("refused").unwrap();
        assert_eq!(ejected.endpoint, endpoints[0]);
        assert_eq!(ejected.ejected_for, Duration::from_secs(30));
        assert_eq!(
            ejected.to_string(),
            "endpoint 10.0.0.1:8080 ejected for 30s"
        );
        for _ in 0..100 {
            assert_ne!(balancer.choose(&endpoints).endpoint(), endpoints[0]);
        }
        // Tried while ejected (the only candidate): a failure does not extend the ejection.
        let again = balancer.choose(&endpoints[..1]).failed("refused").unwrap();
        assert!(again.ejected_for <= Duration::from_secs(30));
        assert_eq!(balancer.ejected().len(), 1);

        // A success puts it back, and starts the count over.
        let lease = balancer.choose(&endpoints[..1]);
        lease.succeeded();
        assert!(balancer.ejected().is_empty());
        assert_eq!(
            lease.failed("refused").unwrap().ejected_for,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn ejections_in_a_row_last_longer() {
        let balancer = Arc::new(Balancer::new(Duration::from_secs(30)));
        let endpoints = addrs(1);
        let ejected = |balancer: &Arc<Balancer>| {
            let ejected = balancer.choose(&endpoints).failed(()).unwrap();
            // As if the ejection ran out.
            balancer
                .lock()
                .get_mut(&endpoints[0])
                .unwrap()
                .ejected_until = None;
            ejected.ejected_for
        };
        assert_eq!(ejected(&balancer), Duration::from_secs(30));
        assert_eq!(ejected(&balancer), Duration::from_secs(60));
        assert_eq!(ejected(&balancer), Duration::from_secs(90));
    }

    #[test]
    fn ejection_can_be_turned_off() {
        let balancer = Arc::new(Balancer::new(Duration::ZERO));
        let endpoints = addrs(1);
        assert_eq!(
            balancer.choose(&endpoints).failed("refused").unwrap_err(),
            "refused"
        );
        assert!(balancer.ejected().is_empty());
    }

    #[test]
    fn ejections_are_capped() {
        let balancer = Arc::new(Balancer::new(Duration::from_secs(120)));
        let endpoints = addrs(1);
        let mut last = Duration::ZERO;
        for _ in 0..5 {
            last = balancer.choose(&endpoints).failed(()).unwrap().ejected_for;
            balancer
                .lock()
                .get_mut(&endpoints[0])
                .unwrap()
                .ejected_until = None;
        }
        assert_eq!(last, MAX_EJECTION);
    }

    #[test]
    fn when_all_are_ejected_all_share_the_load() {
        let balancer = Arc::new(Balancer::new(Duration::from_secs(30)));
        let endpoints = addrs(2);
        for endpoint in &endpoints {
            let _ = balancer.choose(std::slice::from_ref(endpoint)).failed(());
        }
        let leases: Vec<Lease> = (0..10).map(|_| balancer.choose(&endpoints)).collect();
        let on_first = leases
            .iter()
            .filter(|l| l.endpoint() == endpoints[0])
            .count();
        assert_eq!(on_first, 5);
    }
}
