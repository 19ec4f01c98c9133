//! Policy routing inside a pod: packets marked [`REPLY_MARK`] (replies to connections the agent
//! terminated with another address, and transparently intercepted ones) are delivered locally,
//! through a table that holds only `local 0.0.0.0/0 dev lo`.
//!
//! Equivalent to `ip rule add fwmark 0x111/0xfff pref 32764 lookup 100` and
//! `ip route add local 0.0.0.0/0 dev lo table 100`, done over rtnetlink. Blocking: call from the
//! pod's namespace thread.

use std::io;
use std::net::Ipv4Addr;

use futures_util::TryStreamExt;
use netlink_packet_route::route::{RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::{MARK_MASK, REPLY_MARK};

/// The routing table that delivers everything locally.
pub(crate) const LOCAL_TABLE: u32 = 100;
/// The rule's priority: before `main` (32766) and `default` (32767).
pub(crate) const RULE_PRIORITY: u32 = 32764;
/// The loopback interface has this index in every namespace.
const LOOPBACK_INDEX: u32 = 1;

/// Why the pod's policy routing could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("failed to open a netlink socket")]
    Connect(#[source] io::Error),
    #[error("failed to add the fwmark rule")]
    AddRule(#[source] rtnetlink::Error),
    #[error("failed to add the local route")]
    AddRoute(#[source] rtnetlink::Error),
    #[error("failed to list rules")]
    ListRules(#[source] rtnetlink::Error),
    #[error("failed to delete the fwmark rule")]
    DeleteRule(#[source] rtnetlink::Error),
    #[error("failed to delete the local route")]
    DeleteRoute(#[source] rtnetlink::Error),
}

/// Installs the rule and the route; what is already there is kept, never duplicated.
pub(crate) fn install() -> Result<(), RoutingError> {
    with_netlink(|handle| async move {
        if find_rule(&handle).await?.is_none() {
            let mut request = handle
                .rule()
                .add()
                .v4()
                .table_id(LOCAL_TABLE)
                .action(RuleAction::ToTable)
                .priority(RULE_PRIORITY)
                .fw_mark(REPLY_MARK);
            request
                .message_mut()
                .attributes
                .push(RuleAttribute::FwMask(MARK_MASK));
            request.execute().await.map_err(RoutingError::AddRule)?;
        }
        handle
            .route()
            .add(local_route())
            .replace()
            .execute()
            .await
            .map_err(RoutingError::AddRoute)
    })
}

/// Removes the rule and the route, if present.
pub(crate) fn remove() -> Result<(), RoutingError> {
    with_netlink(|handle| async move {
        if let Some(rule) = find_rule(&handle).await? {
            handle
                .rule()
                .del(rule)
                .execute()
                .await
                .map_err(RoutingError::DeleteRule)?;
        }
        match handle.route().del(local_route()).execute().await {
            Err(error) if is_missing(&error) => Ok(()),
            result => result.map_err(RoutingError::DeleteRoute),
        }
    })
}

/// Whether the pod has the rule: for tests and the start-up check.
pub(crate) fn installed() -> Result<bool, RoutingError> {
    with_netlink(|handle| async move { Ok(find_rule(&handle).await?.is_some()) })
}

async fn find_rule(handle: &Handle) -> Result<Option<RuleMessage>, RoutingError> {
    let mut rules = handle.rule().get(rtnetlink::IpVersion::V4).execute();
    while let Some(rule) = rules.try_next().await.map_err(RoutingError::ListRules)? {
        let ours = [
            RuleAttribute::FwMark(REPLY_MARK),
            RuleAttribute::FwMask(MARK_MASK),
            RuleAttribute::Table(LOCAL_TABLE),
        ]
        .iter()
        .all(|wanted| rule.attributes.contains(wanted));
        if ours {
            return Ok(Some(rule));
        }
    }
    Ok(None)
}

fn local_route() -> netlink_packet_route::route::RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .table_id(LOCAL_TABLE)
        .output_interface(LOOPBACK_INDEX)
        .build()
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
