//! ADD while the agent is down: only a pod known to be outside the mesh may start.

use crate::agent::AgentError;
use crate::apiserver;
use crate::cni_error::{CniError, ErrorCode, causes};
use crate::netconf::Netconf;
use crate::protocol::PodRef;

const NOT_REACHABLE: &str =
    "the ambit agent of this node is not reachable; the pod must be captured before it starts";

/// `Ok` only when the API server shows the pod outside the mesh; any doubt fails the ADD
/// with "try again later", so that the runtime retries once the agent is back.
pub(crate) fn ensure_outside_mesh(
    netconf: &Netconf,
    pod: &PodRef,
    agent_error: &AgentError,
) -> Result<(), CniError> {
    let agent_down = format!("{agent_error}: {}", causes(agent_error));
    let refuse = |why: String| {
        Err(CniError::new(
            ErrorCode::TryAgainLater,
            NOT_REACHABLE,
            format!("{agent_down}; {why}"),
        ))
    };
    let Some(kubeconfig) = &netconf.kubeconfig else {
        return refuse(format!(
            "no kubeconfig in the network configuration to tell whether pod {}/{} is in the mesh",
            pod.namespace, pod.name
        ));
    };
    match apiserver::pod_in_mesh(kubeconfig, pod, netconf.timeout) {
        Ok(false) => Ok(()),
        Ok(true) => refuse(format!(
            "pod {}/{} is in the mesh according to the API server",
            pod.namespace, pod.name
        )),
        Err(error) => refuse(format!(
            "cannot tell whether pod {}/{} is in the mesh: {error}: {}",
            pod.namespace,
            pod.name,
            causes(&error)
        )),
    }
}
