//! What the container runtime passes in the environment: `CNI_COMMAND`, `CNI_CONTAINERID`,
//! `CNI_NETNS`, `CNI_IFNAME` and `CNI_ARGS`.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::protocol::PodRef;

/// The command the runtime runs (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CniCommand {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

/// Why the environment cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EnvironmentError {
    #[error("{0} is not set")]
    Missing(&'static str),
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("CNI_COMMAND {0:?} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS")]
    UnknownCommand(String),
    #[error("CNI_ARGS entry {0:?} is not of the form KEY=VALUE")]
    MalformedArg(String),
    #[error("CNI_ARGS names pod {0:?} without K8S_POD_NAMESPACE")]
    PodWithoutNamespace(String),
}

/// The per-container variables, read once; which of them are required depends on the command.
#[derive(Debug)]
pub(crate) struct Environment {
    pub(crate) container_id: Option<String>,
    pub(crate) netns: Option<PathBuf>,
    pub(crate) interface: Option<String>,
    /// The pod named by `CNI_ARGS`; `None` for an invocation from outside Kubernetes.
    pub(crate) pod: Option<PodRef>,
}

impl CniCommand {
    pub(crate) fn from_env(
        lookup: &impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, EnvironmentError> {
        let command =
            utf8(lookup, "CNI_COMMAND")?.ok_or(EnvironmentError::Missing("CNI_COMMAND"))?;
        match command.as_str() {
            "ADD" => Ok(Self::Add),
            "DEL" => Ok(Self::Del),
            "CHECK" => Ok(Self::Check),
            "VERSION" => Ok(Self::Version),
            "GC" => Ok(Self::Gc),
            "STATUS" => Ok(Self::Status),
            _ => Err(EnvironmentError::UnknownCommand(command)),
        }
    }
}

impl Environment {
    pub(crate) fn from_env(
        lookup: &impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, EnvironmentError> {
        let args = utf8(lookup, "CNI_ARGS")?.unwrap_or_default();
        Ok(Self {
            container_id: utf8(lookup, "CNI_CONTAINERID")?.filter(|id| !id.is_empty()),
            netns: lookup("CNI_NETNS")
                .filter(|path| !path.is_empty())
                .map(PathBuf::from),
            interface: utf8(lookup, "CNI_IFNAME")?.filter(|name| !name.is_empty()),
            pod: pod_from_args(&args)?,
        })
    }

    pub(crate) fn container_id(&self) -> Result<&str, EnvironmentError> {
        self.container_id
            .as_deref()
            .ok_or(EnvironmentError::Missing("CNI_CONTAINERID"))
    }

    pub(crate) fn netns(&self) -> Result<&PathBuf, EnvironmentError> {
        self.netns
            .as_ref()
            .ok_or(EnvironmentError::Missing("CNI_NETNS"))
    }

    pub(crate) fn interface(&self) -> Result<&str, EnvironmentError> {
        self.interface
            .as_deref()
            .ok_or(EnvironmentError::Missing("CNI_IFNAME"))
    }
}

fn utf8(
    lookup: &impl Fn(&str) -> Option<OsString>,
    name: &'static str,
) -> Result<Option<String>, EnvironmentError> {
    lookup(name)
        .map(|value| {
            value
                .into_string()
                .map_err(|_| EnvironmentError::NotUtf8(name))
        })
        .transpose()
}

/// The pod in `CNI_ARGS` (`K=V;K=V`): `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`.
/// Other keys (`IgnoreUnknown`, `K8S_POD_INFRA_CONTAINER_ID`, ...) are accepted and ignored.
fn pod_from_args(args: &str) -> Result<Option<PodRef>, EnvironmentError> {
    let mut namespace = None;
    let mut name = None;
    let mut uid = None;
    for entry in args.split(';').filter(|entry| !entry.is_empty()) {
        let (key, value) = entry
            .split_once('=')
            .ok_or_else(|| EnvironmentError::MalformedArg(entry.to_owned()))?;
        match key {
            "K8S_POD_NAMESPACE" => namespace = Some(value),
            "K8S_POD_NAME" => name = Some(value),
            "K8S_POD_UID" => uid = Some(value),
            _ => {}
        }
    }
    let Some(name) = name.filter(|name| !name.is_empty()) else {
        return Ok(None);
    };
    let namespace = namespace
        .filter(|namespace| !namespace.is_empty())
        .ok_or_else(|| EnvironmentError::PodWithoutNamespace(name.to_owned()))?;
    Ok(Some(PodRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: uid.unwrap_or_default().to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn reads_the_pod_from_kubelet_args() {
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=client-7d9;\
                    K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1111-2222";
        assert_eq!(
            pod_from_args(args).unwrap(),
            Some(PodRef {
                namespace: "shop".to_owned(),
                name: "client-7d9".to_owned(),
                uid: "1111-2222".to_owned(),
            })
        );
    }

    #[test]
    fn no_pod_name_is_not_kubernetes() {
        assert_eq!(pod_from_args("").unwrap(), None);
        assert_eq!(pod_from_args("IgnoreUnknown=1;FOO=bar").unwrap(), None);
        assert_eq!(pod_from_args("K8S_POD_NAME=").unwrap(), None);
    }

    #[test]
    fn a_missing_uid_is_empty_and_values_may_hold_equals_signs() {
        let pod = pod_from_args("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b=c;")
            .unwrap()
            .unwrap();
        assert_eq!((pod.name.as_str(), pod.uid.as_str()), ("b=c", ""));
    }

    #[test]
    fn refuses_malformed_args() {
        assert!(matches!(
            pod_from_args("K8S_POD_NAME=b;garbage"),
            Err(EnvironmentError::MalformedArg(entry)) if entry == "garbage"
        ));
        assert!(matches!(
            pod_from_args("K8S_POD_NAME=b"),
            Err(EnvironmentError::PodWithoutNamespace(_))
        ));
    }

    #[test]
    fn reads_the_command_and_the_container() {
        let vars: HashMap<&str, &str> = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", ""),
            ("CNI_IFNAME", "eth0"),
        ]
        .into();
        let lookup = |name: &str| vars.get(name).map(OsString::from);
        assert_eq!(CniCommand::from_env(&lookup).unwrap(), CniCommand::Del);
        let environment = Environment::from_env(&lookup).unwrap();
        assert_eq!(environment.container_id().unwrap(), "c0ffee");
        assert!(matches!(
            environment.netns(),
            Err(EnvironmentError::Missing("CNI_NETNS"))
        ));
        assert_eq!(environment.pod, None);

        let unknown = |name: &str| (name == "CNI_COMMAND").then(|| OsString::from("UPGRADE"));
        assert!(matches!(
            CniCommand::from_env(&unknown),
            Err(EnvironmentError::UnknownCommand(_))
        ));
    }
}
