//! Whole sessions in process: a federation of real identities and a signed registry, an
//! honest driver with dropouts injected at every round, and a scripted malicious
//! coordinator.

mod attacks;
mod exact;

use std::collections::BTreeMap;

use phm_relay::{NodeId, NodeIdentity, Registry, RegistryEntry, SigningKey};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng as _;

use crate::accountant::{Cohort, NoiseTarget, calibrate};
use crate::client::{self, AwaitingPeerKeys};
use crate::error::{Round, SecAggError};
use crate::{AdvertiseKeys, Begin, NodePolicy, Participation, Server, SessionParams, Total};

pub(crate) const NOW: u64 = 1_700_000_000_000;
pub(crate) const LAYOUT: [u8; 32] = [7; 32];

/// Identities and a signed registry.
pub(crate) struct Fed {
    pub(crate) registry_key: SigningKey,
    pub(crate) ids: Vec<NodeIdentity>,
    pub(crate) registry: Registry,
}

pub(crate) fn fed(n: usize) -> Fed {
    let ids: Vec<NodeIdentity> = (0..n)
        .map(|i| NodeIdentity::generate(NodeId::new(format!("N{i:03}")).unwrap()).unwrap())
        .collect();
    let entries = ids
        .iter()
        .map(|id| RegistryEntry {
            node: id.public().clone(),
            valid_from_ms: 0,
            valid_until_ms: u64::MAX,
        })
        .collect();
    let registry_key = SigningKey::from_bytes(&[42; 32]);
    let mut registry = Registry::new("phm-test", 1, u64::MAX, entries);
    registry.sign(&registry_key).unwrap();
    Fed {
        registry_key,
        ids,
        registry,
    }
}

pub(crate) const RHO: f64 = 2.98e-3;

/// Defaults of secagg.md: t_sss = ⌊2N/3⌋ + 1, capped at t_noise; σ from the accountant.
pub(crate) fn params(n: u32, t_noise: u32, dim: usize) -> SessionParams {
    let target = NoiseTarget {
        rho: RHO,
        delta1: 1.0,
        delta2: 1.0,
        dim: dim as u32,
    };
    let cal = calibrate(Cohort { n, t_noise, c: 0 }, &target).unwrap();
    SessionParams {
        n,
        t_sss: (2 * n / 3 + 1).min(t_noise),
        t_noise,
        c: 0,
        lattice: cal.lattice,
        gammas: vec![1.0; dim],
        layout_digest: LAYOUT,
        sigma_share: cal.sigma_share,
    }
}

pub(crate) fn policy(fed: &Fed, p: &SessionParams) -> NodePolicy {
    NodePolicy {
        registry_key: fed.registry_key.verifying_key(),
        min_cohort: 2,
        min_survivors: 0.0,
        assumed_noiseless_peers: 0,
        layout_digest: LAYOUT,
        gammas: p.gammas.clone(),
        rho: RHO,
        delta1: 1.0,
        delta2: 1.0,
    }
}

pub(crate) fn begin_msg(fed: &Fed, p: SessionParams, query_id: &str, nonce: u8) -> Begin {
    Begin {
        query_id: query_id.into(),
        query_digest: [3; 32],
        session_nonce: vec![nonce; 16],
        cohort: fed.ids.iter().map(|i| i.node_id().clone()).collect(),
        params: p,
        registry: fed.registry.clone(),
    }
}

pub(crate) fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// R0 for every node: (states, advertisements, participation records).
pub(crate) fn r0(
    fed: &Fed,
    begin: &Begin,
    policy: &NodePolicy,
) -> (
    Vec<AwaitingPeerKeys>,
    Vec<AdvertiseKeys>,
    Vec<Participation>,
) {
    let mut states = Vec::new();
    let mut keys = Vec::new();
    let mut parts = Vec::new();
    for (i, id) in fed.ids.iter().enumerate() {
        let (s, k, p) = client::begin(id, policy, begin, NOW, None, &mut rng(i as u64)).unwrap();
        states.push(s);
        keys.push(k);
        parts.push(p);
    }
    (states, keys, parts)
}

/// What an honest run observed.
pub(crate) struct Run {
    pub(crate) total: Total,
    pub(crate) expected: Vec<i64>,
    /// (node index, "spend" | "mask") in the order they happened.
    pub(crate) log: Vec<(usize, &'static str)>,
}

/// An honest coordinator and nodes; node i stops responding at `drops[i]` (it never sends
/// that round's message).
pub(crate) fn run(
    fed: &Fed,
    begin: &Begin,
    inputs: &[Vec<i64>],
    drops: &BTreeMap<usize, Round>,
) -> Result<Run, SecAggError> {
    let policy = policy(fed, &begin.params);
    let mut server = Server::new(begin, &fed.registry_key.verifying_key(), NOW)?;
    let alive = |i: usize, r: Round| drops.get(&i).is_none_or(|d| *d > r);
    let mut log = Vec::new();

    let mut s0 = BTreeMap::new();
    let mut parts = BTreeMap::new();
    for (i, id) in fed.ids.iter().enumerate() {
        let (s, k, p) = client::begin(id, &policy, begin, NOW, None, &mut rng(1000 + i as u64))?;
        if alive(i, Round::AdvertiseKeys) {
            server.receive_keys(id.node_id(), k)?;
            s0.insert(i, s);
            parts.insert(i, p);
        }
    }
    let peer_keys = server.close_keys()?;
    let mut s1 = BTreeMap::new();
    for (i, s) in s0 {
        let (s, msg) = s.share_keys(&peer_keys, &mut rng(2000 + i as u64))?;
        if alive(i, Round::ShareKeys) {
            server.receive_shares(fed.ids[i].node_id(), msg)?;
            s1.insert(i, s);
        }
    }
    let forwarded = server.close_shares()?;
    let mut s2 = BTreeMap::new();
    for (i, s) in s1 {
        let id = fed.ids[i].node_id();
        let ready = s.receive_shares(&forwarded[id])?;
        if !alive(i, Round::MaskedInput) {
            continue;
        }
        let committed = ready.commit(parts.get(&i), |_| {
            log.push((i, "spend"));
            Ok::<(), SecAggError>(())
        })?;
        let (s, y) = committed.mask(&inputs[i])?;
        log.push((i, "mask"));
        server.receive_masked(id, y)?;
        s2.insert(i, s);
    }
    let u3 = server.close_masked()?;
    let mut s3 = BTreeMap::new();
    for (i, s) in s2 {
        let (s, sig) = s.consistency(&fed.ids[i], &u3)?;
        if alive(i, Round::Consistency) {
            server.receive_signature(fed.ids[i].node_id(), sig)?;
            s3.insert(i, s);
        }
    }
    let req = server.close_signatures()?;
    for (i, s) in s3 {
        let shares = s.unmask(&req)?;
        // Never both shares of one node.
        for (v, _) in &shares.b_shares {
            assert!(shares.s_shares.iter().all(|(w, _)| w != v));
        }
        if alive(i, Round::Unmasking) {
            server.receive_unmask(fed.ids[i].node_id(), shares)?;
        }
    }
    let total = server.finish()?;
    let mut expected = vec![0i64; begin.params.dim()];
    for id in &total.survivors {
        let i = fed.ids.iter().position(|x| x.node_id() == id).unwrap();
        for (e, x) in expected.iter_mut().zip(&inputs[i]) {
            *e = e.wrapping_add(*x);
        }
    }
    Ok(Run {
        total,
        expected,
        log,
    })
}
