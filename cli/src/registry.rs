//! Node identities and the federation's node registry, for linked and secure queries:
//! `phm keys new --kind node` writes a node's identity file, `phm registry sign` lists
//! the nodes' public identities in a registry signed with the IG leads' key, and
//! `phm registry verify` shows what a node would accept.

use anyhow::Context;
use clap::Subcommand;
use phm_relay::{NodeId, NodeIdentity, NodePublic, Registry, RegistryEntry};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Subcommand)]
pub enum RegistryCmd {
    /// Sign the federation's node registry with the IG leads' registry key.
    #[command(
        after_help = "Example:\n  phm registry sign --federation riverside-wolds-ics --key keys/registry-signer.key \\\n      --node peer/A81001.identity.pub --node peer/RW2.identity.pub --out registry.toml\n  # then pin the printed key in every policy: [peers] registry_key = \"…\""
    )]
    Sign {
        /// The federation the registry is for (each node checks it is its own).
        #[arg(long, env = "PHM_FEDERATION")]
        federation: String,
        /// The IG leads' Ed25519 key (a `phm keys new` key file).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// A node's public identity: a `.pub` file from `phm keys new --kind node`, or
        /// the `phm-node/v1 …` line itself. Repeat for every node.
        #[arg(long = "node", value_name = "FILE|LINE", required = true)]
        nodes: Vec<String>,
        /// Days the registry and its entries stay valid.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Serial number: raise it on every re-issue, so nodes refuse the older one.
        #[arg(long, default_value_t = 1)]
        serial: u64,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Check a registry as a node would, under the key its policy pins.
    Verify {
        #[arg(long, value_name = "FILE")]
        registry: PathBuf,
        /// The base64 key the policies pin (`[peers] registry_key`).
        #[arg(long)]
        registry_key: String,
    },
}

fn now_ms() -> u64 {
    u64::try_from(phm_proto::query::now_unix_ms()).unwrap_or(0)
}

/// A node's public identity from a `.pub` file or the line itself.
fn node_public(arg: &str) -> anyhow::Result<NodePublic> {
    let text = if Path::new(arg).exists() {
        std::fs::read_to_string(arg).with_context(|| format!("cannot read {arg}"))?
    } else {
        arg.to_string()
    };
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or_default();
    line.parse::<NodePublic>()
        .map_err(|e| anyhow::anyhow!("{arg}: not a node identity line ({e}); expected the `phm-node/v1 …` line `phm keys new --kind node` prints"))
}

/// `phm keys new --kind node`: the identity file (secret, 0600) and FILE.pub with
/// the public line. Returns the public line.
pub fn new_node_identity(node_id: &str, out: &Path) -> anyhow::Result<String> {
    let id = NodeId::new(node_id).map_err(|e| anyhow::anyhow!("--node-id {node_id:?}: {e}"))?;
    let identity = NodeIdentity::generate(id).map_err(|e| anyhow::anyhow!("{e}"))?;
    phm_proto::keyfile::write_secret(out, identity.to_file_text().as_bytes())?;
    let line = identity.public().to_text();
    let pub_path = phm_proto::keyfile::pub_path(out);
    std::fs::write(&pub_path, format!("{line}\n"))
        .with_context(|| format!("cannot write {}", pub_path.display()))?;
    Ok(line)
}

pub fn run(cmd: RegistryCmd) -> anyhow::Result<()> {
    match cmd {
        RegistryCmd::Sign {
            federation,
            key,
            nodes,
            days,
            serial,
            out,
        } => {
            phm_proto::query::validate_federation_id(&federation)
                .map_err(|r| anyhow::anyhow!("--federation: {r}"))?;
            let signer = phm_proto::keyfile::load_private_key(&key)?;
            let now = now_ms();
            let until = now.saturating_add(days.saturating_mul(86_400_000));
            let entries = nodes
                .iter()
                .map(|n| {
                    Ok(RegistryEntry {
                        node: node_public(n)?,
                        valid_from_ms: now,
                        valid_until_ms: until,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut registry = Registry::new(&federation, serial, until, entries);
            registry
                .sign(&signer)
                .map_err(|e| anyhow::anyhow!("cannot sign the registry: {e}"))?;
            std::fs::write(&out, registry.to_toml())
                .with_context(|| format!("cannot write {}", out.display()))?;
            crate::outln!(
                "{}",
                phm_proto::signing::public_key_to_base64(&signer.verifying_key())
            );
            let _ = {
                use std::io::Write;
                writeln!(
                    std::io::stderr(),
                    "wrote {} ({} nodes, serial {serial}, valid {days} days); pin the key above in every policy: [peers] registry_key",
                    out.display(),
                    registry.nodes.len()
                )
            };
            Ok(())
        }
        RegistryCmd::Verify {
            registry,
            registry_key,
        } => {
            let key = phm_proto::signing::public_key_from_base64(&registry_key)
                .map_err(|e| anyhow::anyhow!("--registry-key: {e}"))?;
            let text = std::fs::read_to_string(&registry)
                .with_context(|| format!("cannot read {}", registry.display()))?;
            let parsed = Registry::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", registry.display()))?;
            let verified = parsed
                .verify(&key, now_ms())
                .map_err(|e| anyhow::anyhow!("{}: {e}", registry.display()))?;
            crate::outln!(
                "registry of federation {:?}, serial {}, signed by the given key; nodes valid now:",
                verified.federation_id(),
                verified.serial()
            );
            for n in verified.nodes() {
                crate::outln!("  {n}");
            }
            Ok(())
        }
    }
}
