//! The policy config file (JSON) and its translation into the library's
//! [`PolicyState`], with errors that name the field at fault.

use std::path::Path;

use anyhow::Context;
use meshpath::policy::{
    Action, DefaultAction, Endpoint, Identity, NodeName, Peer, PolicyState, Protocol, Rule,
};
use meshpath::IpNet;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The config file as written. Every struct refuses unknown keys, so a
/// misspelt key is an error naming it rather than silently ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    default_action: String,
    #[serde(default)]
    endpoints: Vec<ConfigEndpoint>,
    #[serde(default)]
    policies: Vec<ConfigRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigEndpoint {
    ip: String,
    identity: String,
    /// The node the endpoint runs on (auth keys name it); this node when
    /// left out or equal to `--node`.
    #[serde(default)]
    node: Option<String>,
}

/// This node's name (`--node` or the hostname), when it is a valid node
/// name: endpoints whose `"node"` names it are local. Set once at startup.
static THIS_NODE: std::sync::OnceLock<NodeName> = std::sync::OnceLock::new();

/// Records this node's name for [`load_config`].
pub(crate) fn set_this_node(node: NodeName) {
    let _ = THIS_NODE.set(node);
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigRule {
    from: String,
    to: String,
    protocol: String,
    #[serde(default)]
    ports: Vec<ConfigPort>,
    action: String,
}

/// A port as written: any JSON integer 0-65535 (0 is refused, naming the
/// field, by the library's validation); anything else is an error here.
#[derive(Debug, Clone, Copy)]
struct ConfigPort(u16);

impl<'de> Deserialize<'de> for ConfigPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortVisitor;
        impl Visitor<'_> for PortVisitor {
            type Value = ConfigPort;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a port number (1-65535)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ConfigPort, E> {
                u16::try_from(v)
                    .map(ConfigPort)
                    .map_err(|_| E::custom(format!("{v} is not a port (ports are 1-65535)")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ConfigPort, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is not a port (ports are 1-65535)")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ConfigPort, E> {
                Err(E::custom(format!(
                    "{v} is not a port (ports are integers 1-65535)"
                )))
            }
        }
        d.deserialize_any(PortVisitor)
    }
}

/// Reads, parses and validates the config file. Errors are
/// `config FILE: ...` naming the field (and, for JSON errors, the line and
/// column).
pub(crate) fn load_config(path: &Path) -> anyhow::Result<PolicyState> {
    let ctx = || format!("config {}", path.display());
    let text =
        crate::files::read_text("--config", path, crate::files::CONFIG_LIMIT).with_context(ctx)?;
    let file = parse_config(&text).with_context(ctx)?;
    build_state(file).with_context(ctx)
}

fn parse_config(text: &str) -> anyhow::Result<ConfigFile> {
    let mut de = serde_json::Deserializer::from_str(text);
    let file: ConfigFile = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path: Vec<String> = e.path().iter().map(ToString::to_string).collect();
        json_error(text, &path, e.into_inner())
    })?;
    // Nothing but whitespace may follow the object.
    de.end().map_err(|e| json_error(text, &[], e))?;
    Ok(file)
}

/// A serde_json error as one line naming the field (`invalid
/// policies[0].ports[0]: ...`) where it is known; serde_json appends
/// `at line L column C`.
fn json_error(text: &str, path: &[String], e: serde_json::Error) -> anyhow::Error {
    use serde_json::error::Category;
    let raw = e.to_string();
    if matches!(
        e.classify(),
        Category::Syntax | Category::Eof | Category::Io
    ) {
        return anyhow::anyhow!("not valid JSON: {raw}");
    }
    if !text.trim_start().starts_with('{') {
        return anyhow::anyhow!(
            "the config must be a JSON object {{\"default_action\": ..., \"endpoints\": [...], \
             \"policies\": [...]}}"
        );
    }
    let join = |segs: &[String]| {
        segs.iter().fold(String::new(), |mut out, s| {
            if !out.is_empty() && !s.starts_with('[') {
                out.push('.');
            }
            out.push_str(s);
            out
        })
    };
    // serde quotes names and values in backticks.
    let quoted = |s: &str| s.replace('`', "\"");
    if let Some(rest) = raw.strip_prefix("missing field `") {
        // `missing field `action` at line ..`: name the key in full.
        if let Some((name, tail)) = rest.split_once('`') {
            let mut full = path.to_vec();
            full.push(name.to_string());
            return anyhow::anyhow!(
                "invalid {}: the key is missing (it is required){tail}",
                join(&full)
            );
        }
    }
    if raw.starts_with("unknown field `") || raw.starts_with("duplicate field `") {
        // The path ends with the offending key itself; say where it is.
        let parent = match path.split_last() {
            Some((last, parent)) if raw.contains(&format!("`{last}`")) => parent,
            _ => path,
        };
        return if parent.is_empty() {
            anyhow::anyhow!("{}", quoted(&raw))
        } else {
            anyhow::anyhow!("invalid {}: {}", join(parent), quoted(&raw))
        };
    }
    let msg = raw.replace('`', "");
    if path.is_empty() {
        anyhow::anyhow!("{msg}")
    } else {
        anyhow::anyhow!("invalid {}: {msg}", join(path))
    }
}

/// The library's state from the file's strings. Each string is parsed on
/// its own so that an error names its field (`endpoints[1].ip`,
/// `policies[0].from`, ...); the whole state is then validated by the
/// library, whose errors name fields the same way.
fn build_state(file: ConfigFile) -> anyhow::Result<PolicyState> {
    let default_action: DefaultAction = file
        .default_action
        .parse()
        .map_err(|e| at("default_action", e))?;
    let mut endpoints = Vec::with_capacity(file.endpoints.len());
    for (i, e) in file.endpoints.iter().enumerate() {
        let ip: IpNet =
            e.ip.parse()
                .map_err(|err| at(&format!("endpoints[{i}].ip"), err))?;
        let identity: Identity = e
            .identity
            .parse()
            .map_err(|err| at(&format!("endpoints[{i}].identity"), err))?;
        let node = match &e.node {
            None => None,
            Some(n) => {
                let node: NodeName = n
                    .parse()
                    .map_err(|err| at(&format!("endpoints[{i}].node"), err))?;
                (THIS_NODE.get() != Some(&node)).then_some(node)
            }
        };
        endpoints.push(Endpoint { ip, identity, node });
    }
    let mut policies = Vec::with_capacity(file.policies.len());
    for (i, r) in file.policies.iter().enumerate() {
        let peer = |s: &str, side: &str| -> anyhow::Result<Peer> {
            s.parse().map_err(|err| {
                let e = at(&format!("policies[{i}].{side}"), err);
                anyhow::anyhow!("{e:#} ({side} is a SPIFFE ID, \"*\", \"host\" or \"world\")")
            })
        };
        let from = peer(&r.from, "from")?;
        let to = peer(&r.to, "to")?;
        let protocol: Protocol = r
            .protocol
            .parse()
            .map_err(|err| at(&format!("policies[{i}].protocol"), err))?;
        let action: Action = r
            .action
            .parse()
            .map_err(|err| at(&format!("policies[{i}].action"), err))?;
        policies.push(Rule {
            from,
            to,
            protocol,
            ports: r.ports.iter().map(|p| p.0).collect(),
            action,
        });
    }
    let state = PolicyState {
        default_action,
        endpoints,
        policies,
    };
    // Errors name the field: `invalid policies[0].ports[1]: ...`.
    state.validate()?;
    Ok(state)
}

/// A library parse error re-aimed at the config field `path`: the
/// library names what it parsed (`SPIFFE ID`, `CIDR`, ...), the config
/// user needs the key.
fn at(path: &str, e: meshpath::Error) -> anyhow::Error {
    match e {
        meshpath::Error::Invalid { field, reason } => {
            let what = match field.as_str() {
                // The reason alone does not say what was expected.
                "SPIFFE ID" | "CIDR prefix length" => format!("{field} "),
                _ => String::new(),
            };
            anyhow::anyhow!("invalid {path}: {what}{reason}")
        }
        other => anyhow::Error::new(other).context(format!("invalid {path}")),
    }
}
