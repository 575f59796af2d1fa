//! Applying the policy of `--config`: at startup and on SIGHUP.

use std::path::Path;

use anyhow::Context;
use meshpath::policy::{PolicyChange, PolicyState};
use meshpath::Datapath;

use crate::cli::Args;
use crate::config::load_config;
use crate::output::{one_line, say, warn};

/// Applies `state`, resets the flows it denies in every
/// `--policy-reset-netns`, and prints the `policy applied` line. At
/// startup a failed namespace reset is an error; on reload a warning (the
/// policy is in force either way).
pub(crate) fn apply_policy(
    dp: &Datapath,
    path: &Path,
    state: &PolicyState,
    args: &Args,
    startup: bool,
) -> anyhow::Result<()> {
    let change: PolicyChange = match dp.replace_policy(state) {
        Ok(c) => c,
        Err(e) if dp.policy().as_ref() == Some(state) => {
            // The switch happened; resetting the denied flows failed.
            return Err(anyhow::Error::new(e).context(format!(
                "config {}: the policy is applied, but resetting the flows it denies failed",
                path.display()
            )));
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "config {}: applying it (the policy in force is unchanged)",
                path.display()
            )))
        }
    };
    for c in &change.identity_collisions {
        // The rest of the policy is in force; this pair is not.
        warn(&format!(
            "config {}: identity collision: {} and {} have the same identity number {}: \
             {} refused with its {} endpoints and {} rules (is the --identity-key secret?)",
            path.display(),
            c.kept,
            c.refused,
            c.number,
            c.refused,
            c.endpoints.len(),
            c.rules.len()
        ));
    }
    let mut reset = change.flows_reset;
    if let Some(e) = &change.reset_error {
        // In force, but established flows it denies may live on: say so.
        warn(&format!(
            "config {}: the policy is applied, but resetting the established flows it denies failed: {e}",
            path.display()
        ));
    }
    for ns in &args.policy_reset_netns {
        match dp.reset_denied_flows_in(ns) {
            Ok(n) => reset += n,
            Err(e) => {
                let e = anyhow::Error::new(e).context(format!(
                    "--policy-reset-netns {}: resetting denied flows",
                    ns.display()
                ));
                if startup {
                    return Err(e);
                }
                warn(&one_line(&e));
            }
        }
    }
    say(&format!(
        "agent: policy applied: generation {}, {} endpoints, {} rules (+{}/-{} entries), {} flows reset",
        change.generation,
        state.endpoints.len(),
        state.policies.len(),
        change.endpoints_written + change.rules_written,
        change.endpoints_removed + change.rules_removed,
        reset
    ))
    .context("writing to stdout")
}

/// `agent: error:` line and leaves the policy in force as it was.
pub(crate) fn reload(dp: &Datapath, args: &Args) {
    let Some(path) = &args.config else {
        warn("SIGHUP received without --config: there is no policy to reload");
        return;
    };
    let result = load_config(path).and_then(|state| apply_policy(dp, path, &state, args, false));
    if let Err(e) = result {
        crate::output::error(&one_line(&e));
    }
}
