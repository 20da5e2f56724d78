//! What a session is: its announced parameters, the `Begin` message that opens it, the
//! node's own policy that the parameters must satisfy, and the session id derived from
//! all of it.

use phm_relay::{NodeId, NodePublic, Protocol, Registry, VerifiedRegistry, VerifyingKey};

use crate::accountant::{self, MIN_SIGMA};
use crate::canon::Canon;
use crate::encoding::Encoding;
use crate::error::SecAggError;

/// Largest cohort: a share's x-coordinate is one byte on the wire (1..=255).
pub const MAX_COHORT: usize = 255;

/// Label of the parameters' canonical bytes (bound into the session id).
const PARAMS_LABEL: &str = "phm-secagg/v1 params";

/// The parameters every member must agree on; bound into the session id, so a coordinator
/// that tells two nodes different parameters gets two sessions that cannot talk.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionParams {
    /// N, the cohort size.
    pub n: u32,
    /// Shamir threshold: shares needed to reconstruct a secret. Must exceed (N + c)/2.
    pub t_sss: u32,
    /// Fewest survivors (|U3|) whose sum may ever be unmasked: the noise is calibrated for it.
    pub t_noise: u32,
    /// Survivors assumed to add no noise (`assumed_noiseless_peers`).
    pub c: u32,
    /// Lattice factor g (a power of two).
    pub lattice: u64,
    /// Fixed-point step γ per coordinate (1.0 for a COUNT); the vector has this many.
    pub gammas: Vec<f64>,
    /// Digest of the declared layout (group keys × aggregates), computed by the integration.
    pub layout_digest: [u8; 32],
    /// σ of each node's noise share in lattice units.
    pub sigma_share: f64,
}

impl SessionParams {
    /// Number of coordinates.
    pub fn dim(&self) -> usize {
        self.gammas.len()
    }

    /// The encoding these parameters imply.
    pub fn encoding(&self) -> Result<Encoding, SecAggError> {
        Encoding::new(self.lattice, self.gammas.clone(), self.n)
    }

    /// Canonical bytes: every field, floats by their IEEE bits, and the modulus (64 bits),
    /// so that a future modulus change is a different session.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut c = Canon::new(PARAMS_LABEL);
        c.u64(64)
            .u64(self.n.into())
            .u64(self.t_sss.into())
            .u64(self.t_noise.into())
            .u64(self.c.into())
            .u64(self.lattice)
            .u64(self.gammas.len() as u64);
        for g in &self.gammas {
            c.u64(g.to_bits());
        }
        c.bytes(&self.layout_digest).u64(self.sigma_share.to_bits());
        c.finish()
    }

    /// The protocol's own rules, whatever any policy says: 2 ≤ N ≤ 255; c < t_sss;
    /// t_sss > (N + c)/2 (so two disjoint signer sets of t_sss cannot both exist among
    /// honest nodes: the active-security condition of federated-compute's parameter finder); t_sss ≤ t_noise ≤ N (so that
    /// a session with t_noise survivors can reconstruct); σ ≥ ½; a valid encoding.
    pub fn check(&self) -> Result<(), SecAggError> {
        let bad = |s: String| Err(SecAggError::BadParams(s));
        let (n, t, tn, c) = (self.n, self.t_sss, self.t_noise, self.c);
        if n < 2 || n as usize > MAX_COHORT {
            return bad(format!("N = {n}; it must be 2..={MAX_COHORT}"));
        }
        if 2 * u64::from(t) <= u64::from(n) + u64::from(c) {
            return bad(format!("t_sss = {t} must exceed (N + c)/2 = ({n} + {c})/2"));
        }
        if t < 2 || t > tn || tn > n {
            return bad(format!("need 2 ≤ t_sss ≤ t_noise ≤ N; got {t}, {tn}, {n}"));
        }
        if c >= tn {
            return bad(format!("c = {c} must be below t_noise = {tn}"));
        }
        if !self.sigma_share.is_finite() || self.sigma_share < MIN_SIGMA {
            return Err(SecAggError::SigmaTooSmall(self.sigma_share));
        }
        self.encoding()?;
        Ok(())
    }
}

/// What the coordinator sends to open a session (R0's request).
#[derive(Debug, Clone)]
pub struct Begin {
    /// The signed query's id (the integration has already authenticated the query).
    pub query_id: String,
    /// SHA-256 of the signed query's canonical bytes.
    pub query_digest: [u8; 32],
    /// Fresh per session, 16–64 bytes.
    pub session_nonce: Vec<u8>,
    /// The cohort, as node ids; order does not matter.
    pub cohort: Vec<NodeId>,
    pub params: SessionParams,
    /// The registry as the coordinator relays it: verified by each node under its pinned key.
    pub registry: Registry,
}

/// A session's derived identity: what both sides compute from a [`Begin`].
#[derive(Debug, Clone)]
pub(crate) struct SessionFacts {
    pub(crate) session_id: [u8; 32],
    pub(crate) registry: VerifiedRegistry,
    /// The cohort sorted by node id; a member's Shamir x-coordinate is its index + 1.
    pub(crate) cohort: Vec<NodePublic>,
}

impl SessionFacts {
    /// Verify the registry, resolve the cohort in it and derive the session id:
    /// `phm_relay::session_id(SecAgg, query digest, nonce, cohort, params ‖ registry digest
    /// ‖ query id)`.
    pub(crate) fn derive(
        begin: &Begin,
        registry_key: &VerifyingKey,
        now_ms: u64,
    ) -> Result<SessionFacts, SecAggError> {
        begin.params.check()?;
        let registry = begin.registry.verify(registry_key, now_ms)?;
        if begin.cohort.len() != begin.params.n as usize {
            return Err(SecAggError::BadParams(format!(
                "the cohort has {} members but N = {}",
                begin.cohort.len(),
                begin.params.n
            )));
        }
        let mut cohort: Vec<NodePublic> = registry
            .cohort(&begin.cohort)?
            .into_iter()
            .cloned()
            .collect();
        cohort.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let mut extra = Canon::new("phm-secagg/v1 session");
        extra
            .bytes(&begin.params.canonical_bytes())
            .bytes(&registry.digest())
            .bytes(begin.query_id.as_bytes());
        let session_id = phm_relay::session_id(
            Protocol::SecAgg,
            &begin.query_digest,
            &begin.session_nonce,
            cohort.iter(),
            &extra.finish(),
        )?;
        Ok(SessionFacts {
            session_id,
            registry,
            cohort,
        })
    }

    /// Shamir x-coordinate of a member (index in the sorted cohort + 1).
    pub(crate) fn x_of(&self, node: &NodeId) -> Option<u8> {
        self.cohort
            .iter()
            .position(|p| &p.node_id == node)
            .and_then(|i| u8::try_from(i + 1).ok())
    }

    pub(crate) fn member(&self, node: &NodeId) -> Option<&NodePublic> {
        self.cohort.iter().find(|p| &p.node_id == node)
    }
}

/// A node's own rules for joining a session (the integration fills it from the policy's
/// `[secure_aggregation]` block and the query's decision).
#[derive(Debug, Clone)]
pub struct NodePolicy {
    /// The IG leads' registry key, pinned by policy.
    pub registry_key: VerifyingKey,
    /// Smallest cohort this node joins (`min_cohort`, default 10).
    pub min_cohort: u32,
    /// t_noise must be at least ⌈min_survivors · N⌉ (default 0.9).
    pub min_survivors: f64,
    /// c must be at least this (`assumed_noiseless_peers`, default 0).
    pub assumed_noiseless_peers: u32,
    /// The layout this node computed for the query; the announced one must equal it.
    pub layout_digest: [u8; 32],
    /// γ per coordinate this node expects.
    pub gammas: Vec<f64>,
    /// ρ this node's policy allows for the release.
    pub rho: f64,
    /// ‖Δ‖₁ and ‖Δ‖₂ of one person's rows at this node, in integer units (persons,
    /// γ-steps); multiplied by g before the check.
    pub delta1: f64,
    pub delta2: f64,
}

impl NodePolicy {
    /// The R0 checks of secagg.md's table that concern parameters: N ≥ min_cohort;
    /// t_noise ≥ ⌈min_survivors·N⌉; c ≥ assumed_noiseless_peers; the protocol's own
    /// threshold rules ([`SessionParams::check`]); layout and γ equal this node's; and σ_share
    /// gives this node's ρ for every survivor count s ∈ [t_noise, N] with s − c honest.
    pub fn check(&self, p: &SessionParams) -> Result<(), SecAggError> {
        p.check()?;
        let bad = |s: String| Err(SecAggError::BadParams(s));
        if p.n < self.min_cohort {
            return bad(format!(
                "N = {} is below this node's min_cohort {}",
                p.n, self.min_cohort
            ));
        }
        if !(self.min_survivors.is_finite() && (0.0..=1.0).contains(&self.min_survivors)) {
            return bad("min_survivors must be within 0..=1".into());
        }
        let need = (self.min_survivors * f64::from(p.n)).ceil() as u32;
        if p.t_noise < need {
            return bad(format!(
                "t_noise = {} is below ⌈{}·N⌉ = {need}",
                p.t_noise, self.min_survivors
            ));
        }
        if p.c < self.assumed_noiseless_peers {
            return bad(format!(
                "c = {} is below this node's assumed_noiseless_peers {}",
                p.c, self.assumed_noiseless_peers
            ));
        }
        if p.layout_digest != self.layout_digest {
            return bad("the layout digest is not the one this node computed".into());
        }
        if p.gammas.len() != self.gammas.len()
            || p.gammas
                .iter()
                .zip(&self.gammas)
                .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return bad("the fixed-point steps are not the ones this node expects".into());
        }
        let dim = u32::try_from(p.dim())
            .map_err(|_| SecAggError::BadParams("too many coordinates".into()))?;
        let g = p.lattice as f64;
        for s in p.t_noise..=p.n {
            let honest = s - p.c;
            let rho =
                accountant::rho_ddg(honest, p.sigma_share, dim, g * self.delta1, g * self.delta2)?;
            if rho > self.rho {
                return Err(SecAggError::NoiseTooSmall {
                    announced: p.sigma_share,
                    honest,
                    rho_got: rho,
                    rho_required: self.rho,
                });
            }
        }
        Ok(())
    }
}
