//! Policy routing inside a pod, over rtnetlink, for both capture backends. Every rule ambit owns
//! has a priority of its own (32760 to 32764, before `main` at 32766), which is how it is found
//! again and removed, whatever backend installed it.
//!
//! - [`Steering::Marked`] (nftables): packets marked [`REPLY_MARK`] (replies to connections the
//!   agent terminated with another address, and transparently intercepted ones) are delivered
//!   locally: `ip rule add fwmark 0x111/0xfff pref 32764 lookup 100` with
//!   `ip route add local 0.0.0.0/0 dev lo table 100`.
//! - [`Steering::AllTcp`] (eBPF): all the pod's TCP is delivered locally, where the sk_lookup
//!   program hands it to the agent, except the agent's own ([`AGENT_MARK`]) and kubelet's:
//!   `to 169.254.7.127 lookup main` (32760), `fwmark 0x539/0xfff lookup main` (32761),
//!   `ipproto tcp lookup 100` (32762) with `local 0.0.0.0/0 dev lo src <pod IP> table 100`, and
//!   IPv6 TCP, which the agent does not carry yet, `prohibit` (32762): it fails closed. DNS
//!   over UDP is delivered locally too, for the DNS proxy: `ipproto udp dport 53 lookup 100`
//!   (32763), and over IPv6 `prohibit`.
//!
//! Blocking: call from a thread inside the pod's namespace ([`PodNetns::run`](crate::PodNetns::run)).

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use netlink_packet_route::IpProtocol;
use netlink_packet_route::route::{RouteMessage, RouteScope, RouteType};
use netlink_packet_route::rule::{
    RuleAction, RuleAttribute, RuleFlags, RuleMessage, RulePortRange,
};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use crate::{AGENT_MARK, CAPTURED_DNS_PORT, KUBELET_PROBE_SOURCE, MARK_MASK, REPLY_MARK};

/// The routing table that delivers everything locally.
const LOCAL_TABLE: u32 = 100;
/// The main table's id.
const MAIN_TABLE: u32 = 254;
/// The loopback interface has this index in every namespace.
const LOOPBACK_INDEX: u32 = 1;
/// The priorities of ambit's rules; no other rule of a pod uses them.
const PRIORITIES: std::ops::RangeInclusive<u32> = 32760..=32764;

/// Why the pod's policy routing could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("failed to open a netlink socket")]
    Connect(#[source] io::Error),
    #[error("failed to add the rule of priority {priority}")]
    AddRule {
        priority: u32,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("failed to add the local route")]
    AddRoute(#[source] rtnetlink::Error),
    #[error("failed to list rules")]
    ListRules(#[source] rtnetlink::Error),
    #[error("failed to delete a rule")]
    DeleteRule(#[source] rtnetlink::Error),
    #[error("failed to delete the local route")]
    DeleteRoute(#[source] rtnetlink::Error),
}

/// Which of the pod's traffic is delivered locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Steering {
    /// Packets carrying [`REPLY_MARK`] (nftables capture).
    Marked,
    /// All TCP but the agent's own and kubelet's (eBPF capture), from the pod's address.
    AllTcp { pod_ip: Ipv4Addr },
}

/// One rule of a steering.
struct Rule {
    priority: u32,
    ip_version: IpVersion,
    attributes: Vec<RuleAttribute>,
    action: RuleAction,
    table: u32,
}

impl Steering {
    fn rules(self) -> Vec<Rule> {
        let fwmark = |mark| {
            vec![
                RuleAttribute::FwMark(mark),
                RuleAttribute::FwMask(MARK_MASK),
            ]
        };
        let to_table = |priority, ip_version, attributes, table| Rule {
            priority,
            ip_version,
            attributes,
            action: RuleAction::ToTable,
            table,
        };
        match self {
            Self::Marked => vec![to_table(
                32764,
                IpVersion::V4,
                fwmark(REPLY_MARK),
                LOCAL_TABLE,
            )],
            Self::AllTcp { .. } => {
                let kubelet = IpAddr::V4(Ipv4Addr::from(KUBELET_PROBE_SOURCE));
                let tcp = || vec![RuleAttribute::IpProtocol(IpProtocol::Tcp)];
                let dns = RulePortRange {
                    start: CAPTURED_DNS_PORT,
                    end: CAPTURED_DNS_PORT,
                };
                let udp_dns = || {
                    vec![
                        RuleAttribute::IpProtocol(IpProtocol::Udp),
                        RuleAttribute::DestinationPortRange(dns),
                    ]
                };
                vec![
                    to_table(
                        32760,
                        IpVersion::V4,
                        vec![RuleAttribute::Destination(kubelet)],
                        MAIN_TABLE,
                    ),
                    to_table(32761, IpVersion::V4, fwmark(AGENT_MARK), MAIN_TABLE),
                    to_table(32762, IpVersion::V4, tcp(), LOCAL_TABLE),
                    Rule {
                        priority: 32762,
                        ip_version: IpVersion::V6,
                        attributes: tcp(),
                        action: RuleAction::Prohibit,
                        table: 0,
                    },
                    to_table(32763, IpVersion::V4, udp_dns(), LOCAL_TABLE),
                    Rule {
                        priority: 32763,
                        ip_version: IpVersion::V6,
                        attributes: udp_dns(),
                        action: RuleAction::Prohibit,
                        table: 0,
                    },
                ]
            }
        }
    }

    fn local_route(self) -> RouteMessage {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(LOCAL_TABLE)
            .output_interface(LOOPBACK_INDEX);
        match self {
            Self::Marked => route.build(),
            // Without it, a connection the pod opens would take the destination as its source.
            Self::AllTcp { pod_ip } => route.pref_source(pod_ip).build(),
        }
    }
}

/// Installs `steering` in place of whatever ambit had installed, make-before-break: the local
/// route is replaced in one step, the rules it lacks are added before the rules it does not want
/// are deleted, and rules already in place stay. So the pod's traffic is steered throughout,
/// also when a new agent installs what the old one did.
pub(crate) fn install(steering: Steering) -> Result<(), RoutingError> {
    with_netlink(|handle| async move {
        handle
            .route()
            .add(steering.local_route())
            .replace()
            .execute()
            .await
            .map_err(RoutingError::AddRoute)?;
        let mut stale = our_rules(&handle).await?;
        for rule in steering.rules() {
            let priority = rule.priority;
            let mut request = handle.rule().add().priority(priority).action(rule.action);
            if rule.action == RuleAction::ToTable {
                request = request.table_id(rule.table);
            }
            let message = request.message_mut();
            message.header.family = match rule.ip_version {
                IpVersion::V4 => netlink_packet_route::AddressFamily::Inet,
                IpVersion::V6 => netlink_packet_route::AddressFamily::Inet6,
            };
            // A destination without its prefix length would match every destination.
            if rule
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Destination(_)))
            {
                message.header.dst_len = 32;
            }
            message.attributes.extend(rule.attributes);
            let wanted = RuleKey::of(message);
            if let Some(existing) = stale.iter().position(|r| RuleKey::of(r) == wanted) {
                stale.swap_remove(existing);
                continue;
            }
            request
                .execute()
                .await
                .map_err(|source| RoutingError::AddRule { priority, source })?;
        }
        delete_rules(&handle, stale).await
    })
}

/// What makes two rules the same rule, whichever way the kernel spells it back: the header, the
/// priority and table, and every selector (a dump carries attributes of the kernel's own, such as
/// the protocol that added the rule, which do not make it another rule).
#[derive(Debug, PartialEq, Eq)]
struct RuleKey {
    family: netlink_packet_route::AddressFamily,
    action: RuleAction,
    flags: RuleFlags,
    src_len: u8,
    dst_len: u8,
    tos: u8,
    priority: Option<u32>,
    table: u32,
    matches: Vec<String>,
}

impl RuleKey {
    fn of(rule: &RuleMessage) -> Self {
        let table = rule
            .attributes
            .iter()
            .find_map(|a| match a {
                RuleAttribute::Table(table) => Some(*table),
                _ => None,
            })
            .unwrap_or(u32::from(rule.header.table));
        let mut matches: Vec<String> = rule
            .attributes
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    RuleAttribute::FwMark(_)
                        | RuleAttribute::FwMask(_)
                        | RuleAttribute::IpProtocol(_)
                        | RuleAttribute::Source(_)
                        | RuleAttribute::Destination(_)
                        | RuleAttribute::SourcePortRange(_)
                        | RuleAttribute::DestinationPortRange(_)
                        | RuleAttribute::Iifname(_)
                        | RuleAttribute::Oifname(_)
                        | RuleAttribute::UidRange(_)
                        | RuleAttribute::Goto(_)
                )
            })
            .map(|a| format!("{a:?}"))
            .collect();
        matches.sort();
        Self {
            family: rule.header.family,
            action: rule.header.action,
            flags: rule.header.flags,
            src_len: rule.header.src_len,
            dst_len: rule.header.dst_len,
            tos: rule.header.tos,
            priority: found_priority(rule),
            table,
            matches,
        }
    }
}

/// Removes every rule ambit owns and the local route, if present.
pub(crate) fn remove() -> Result<(), RoutingError> {
    with_netlink(|handle| async move {
        delete_rules(&handle, our_rules(&handle).await?).await?;
        let route = Steering::Marked.local_route();
        match handle.route().del(route).execute().await {
            Err(error) if is_missing(&error) => Ok(()),
            result => result.map_err(RoutingError::DeleteRoute),
        }
    })
}

/// Whether the pod has any of ambit's rules.
pub(crate) fn any_installed() -> Result<bool, RoutingError> {
    with_netlink(|handle| async move { Ok(!our_rules(&handle).await?.is_empty()) })
}

async fn delete_rules(handle: &Handle, rules: Vec<RuleMessage>) -> Result<(), RoutingError> {
    for rule in rules {
        match handle.rule().del(rule).execute().await {
            Err(error) if is_missing(&error) => {}
            result => result.map_err(RoutingError::DeleteRule)?,
        }
    }
    Ok(())
}

/// The rules, IPv4 and IPv6, with one of ambit's priorities.
async fn our_rules(handle: &Handle) -> Result<Vec<RuleMessage>, RoutingError> {
    let mut ours = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let mut rules = handle.rule().get(version).execute();
        while let Some(rule) = rules.try_next().await.map_err(RoutingError::ListRules)? {
            if found_priority(&rule).is_some_and(|p| PRIORITIES.contains(&p)) {
                ours.push(rule);
            }
        }
    }
    Ok(ours)
}

fn found_priority(rule: &RuleMessage) -> Option<u32> {
    rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Priority(priority) => Some(*priority),
        _ => None,
    })
}

fn is_missing(error: &rtnetlink::Error) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(message)
        if message.code.is_some_and(|code| code.get() == -nix::libc::ESRCH || code.get() == -nix::libc::ENOENT))
}

/// Runs `work` against a netlink socket of the calling thread's namespace.
fn with_netlink<F, Fut, T>(work: F) -> Result<T, RoutingError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, RoutingError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(RoutingError::Connect)?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Connect)?;
        let connection = tokio::spawn(connection);
        let result = work(handle).await;
        connection.abort();
        result
    })
}
