//! ADD while the agent is down: only a pod known to be outside the mesh may start.

use crate::agent::AgentError;
use crate::cni_error::{CniError, ErrorCode, causes};
use crate::netconf::Netconf;
use crate::protocol::PodRef;

const NOT_REACHABLE: &str =
    "the ambit agent of this node is not reachable; the pod must be captured before it starts";

/// `Ok` only when the pod is known to be outside the mesh; any doubt fails the ADD with
/// "try again later", so that the runtime retries once the agent is back.
pub(crate) fn ensure_outside_mesh(
    netconf: &Netconf,
    pod: &PodRef,
    agent_error: &AgentError,
) -> Result<(), CniError> {
    let agent_down = format!("{agent_error}: {}", causes(agent_error));
    let Some(_kubeconfig) = &netconf.kubeconfig else {
        return Err(CniError::new(
            ErrorCode::TryAgainLater,
            NOT_REACHABLE,
            format!(
                "{agent_down}; no kubeconfig in the network configuration to tell whether pod {}/{} is in the mesh",
                pod.namespace, pod.name
            ),
        ));
    };
    Err(CniError::new(
        ErrorCode::TryAgainLater,
        NOT_REACHABLE,
        agent_down,
    ))
}
