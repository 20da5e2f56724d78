//! The node's side of a session: one typed state per round, each consumed by the step that
//! leaves it, so a round cannot be run twice (a coordinator that asks again gets nothing,
//! because the state that could answer no longer exists) and no step can be skipped.
//!
//! [`begin`] (R0) → [`AwaitingPeerKeys`] → `share_keys` (R1) → [`AwaitingShares`] →
//! `receive_shares` (R2, checks) → [`ReadyToCommit`] → `commit` (the node records its spend
//! durably *here*) → [`Committed`] → `mask` (R2, y_u) → [`AwaitingSurvivors`] →
//! `consistency` (R3) → [`AwaitingUnmask`] → `unmask` (R4) → [`UnmaskShares`].
//!
//! Every secret (c- and s-keys, b_u, shares held) lives in these states and is wiped when
//! they drop: x25519-dalek's `StaticSecret` with its `zeroize` feature, and `Zeroizing`
//! buffers for everything else.

use std::collections::{BTreeMap, BTreeSet};

use phm_relay::{NodeId, NodeIdentity, Protocol, StatementCheck, verify_statements};
use rand_core::{CryptoRng, RngCore};
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use crate::crypto::{self, Share};
use crate::encoding::add_into;
use crate::error::{Round, SecAggError};
use crate::messages::{
    AdvertiseKeys, ConsistencySig, EncryptedShares, ForwardedShares, KEYS_KIND, MaskedInput,
    PeerKeys, ShareKeys, SurvivorSet, U3_KIND, UnmaskRequest, UnmaskShares,
};
use crate::params::{Begin, NodePolicy, SessionFacts, SessionParams};
use crate::participation::{Participation, admit_session, admit_spend};
use crate::prg;

/// What every state knows about its session.
#[derive(Debug)]
struct Ctx {
    me: NodeId,
    query_id: String,
    facts: SessionFacts,
    params: SessionParams,
    /// ρ if the node's own y_u were unmasked alone (ρ_local, for the audit record).
    rho_local: f64,
}

impl Ctx {
    fn session_id(&self) -> &[u8; 32] {
        &self.facts.session_id
    }

    fn need(&self, round: Round, have: usize, need: u32) -> Result<(), SecAggError> {
        if have < need as usize {
            return Err(SecAggError::TooFewSurvivors {
                round,
                have,
                need: need as usize,
            });
        }
        Ok(())
    }

    fn check_me(&self, me: &NodeIdentity) -> Result<(), SecAggError> {
        if *me.node_id() != self.me {
            return Err(SecAggError::WrongIdentity {
                expected: self.me.clone(),
                got: me.node_id().clone(),
            });
        }
        Ok(())
    }
}

/// R0: check the session against this node's policy and the registry, refuse a second
/// session for the query, and advertise fresh keys.
///
/// Checks: the registry verifies under the pinned key at `now_ms` (unsigned, foreign-signed,
/// altered or expired registries are refused); the cohort ⊆ registry with no repeats; this
/// node is in it with exactly its identity's keys; the parameters satisfy
/// [`NodePolicy::check`]; and `prior` (the store's record for this query id) is empty.
///
/// The caller must durably record the returned [`Participation`] before sending the keys.
/// No budget is spent here.
pub fn begin<R: RngCore + CryptoRng>(
    me: &NodeIdentity,
    policy: &NodePolicy,
    begin: &Begin,
    now_ms: u64,
    prior: Option<&Participation>,
    rng: &mut R,
) -> Result<(AwaitingPeerKeys, AdvertiseKeys, Participation), SecAggError> {
    let facts = SessionFacts::derive(begin, &policy.registry_key, now_ms)?;
    if facts.member(me.node_id()).is_none() {
        return Err(SecAggError::NotInCohort(me.node_id().clone()));
    }
    facts.registry.check_identity(me)?;
    policy.check(&begin.params)?;
    let participation = admit_session(prior, &begin.query_id, &facts.session_id)?;
    let (c_sk, c_pk) = crypto::keypair(rng);
    let (s_sk, s_pk) = crypto::shareable_keypair(rng)?;
    let signature = me.sign_statement(
        Protocol::SecAgg,
        &facts.session_id,
        KEYS_KIND,
        &AdvertiseKeys::statement_body(&c_pk, &s_pk),
    );
    let own = AdvertiseKeys {
        node: me.node_id().clone(),
        c_pk,
        s_pk,
        signature,
    };
    // Unmasked, y_u carries one share of noise: ρ_local = Δ₂²/(2σ_share²) in lattice units.
    let g = begin.params.lattice as f64;
    let rho_local = (g * policy.delta2).powi(2) / (2.0 * begin.params.sigma_share.powi(2));
    let ctx = Ctx {
        me: me.node_id().clone(),
        query_id: begin.query_id.clone(),
        facts,
        params: begin.params.clone(),
        rho_local,
    };
    Ok((
        AwaitingPeerKeys {
            ctx,
            c_sk,
            s_sk,
            own: own.clone(),
        },
        own,
        participation,
    ))
}

/// After R0: waiting for the advertised keys of U1.
pub struct AwaitingPeerKeys {
    ctx: Ctx,
    c_sk: StaticSecret,
    s_sk: StaticSecret,
    own: AdvertiseKeys,
}

impl std::fmt::Debug for AwaitingPeerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwaitingPeerKeys")
            .field("me", &self.ctx.me)
            .finish_non_exhaustive()
    }
}

impl AwaitingPeerKeys {
    /// The session id this node derived (bound into every signature and key).
    pub fn session_id(&self) -> [u8; 32] {
        self.ctx.facts.session_id
    }

    /// R1: check U1's keys and send each peer its shares of s_u^SK and b_u.
    ///
    /// Refuses: a key list that omits this node or relays other keys for it (substitution);
    /// a member outside the cohort or named twice; a signature that does not verify under
    /// the member's registry key over this session's id (substituted or spliced keys); any
    /// public key seen twice (reflection/replay); |U1| < t_noise.
    pub fn share_keys<R: RngCore + CryptoRng>(
        self,
        peers: &PeerKeys,
        rng: &mut R,
    ) -> Result<(AwaitingShares, ShareKeys), SecAggError> {
        let ctx = self.ctx;
        let round = Round::ShareKeys;
        let mut u1: BTreeMap<NodeId, AdvertiseKeys> = BTreeMap::new();
        let mut seen_keys: BTreeSet<[u8; 32]> = BTreeSet::new();
        // Signatures are checked together once every entry has passed the other checks.
        let mut signed = Vec::with_capacity(peers.keys.len());
        for k in &peers.keys {
            let member = ctx
                .facts
                .member(&k.node)
                .ok_or_else(|| SecAggError::NotAMember {
                    round,
                    node: k.node.clone(),
                    set: "the cohort",
                })?;
            if u1.contains_key(&k.node) {
                return Err(SecAggError::Duplicate {
                    round,
                    node: k.node.clone(),
                });
            }
            if k.node == ctx.me {
                if *k != self.own {
                    return Err(SecAggError::OwnKeysSubstituted);
                }
            } else {
                let body = AdvertiseKeys::statement_body(&k.c_pk, &k.s_pk);
                signed.push((member, body, k));
            }
            if !seen_keys.insert(k.c_pk) || !seen_keys.insert(k.s_pk) {
                return Err(SecAggError::RepeatedKey(k.node.clone()));
            }
            u1.insert(k.node.clone(), k.clone());
        }
        let checks: Vec<StatementCheck<'_>> = signed
            .iter()
            .map(|(member, body, k)| StatementCheck {
                signer: member,
                body,
                signature: &k.signature,
            })
            .collect();
        verify_statements(Protocol::SecAgg, ctx.session_id(), KEYS_KIND, &checks)
            .map_err(|i| SecAggError::KeySignature(signed[i].2.node.clone()))?;
        if !u1.contains_key(&ctx.me) {
            return Err(SecAggError::Protocol {
                round,
                reason: "the key list (U1) omits this node".into(),
            });
        }
        ctx.need(round, u1.len(), ctx.params.t_noise)?;

        let n = ctx.params.n as usize;
        let t = ctx.params.t_sss as usize;
        let s_bytes = Zeroizing::new(self.s_sk.to_bytes());
        let s_shares = crypto::split(&s_bytes, t, n, rng)?;
        let b_u = crypto::secret(rng)?;
        let b_shares = crypto::split(&b_u, t, n, rng)?;
        let share_of = |shares: &[Share], node: &NodeId| -> Result<Share, SecAggError> {
            ctx.facts
                .x_of(node)
                .and_then(|x| shares.get(usize::from(x) - 1).cloned())
                .ok_or_else(|| SecAggError::Sharing(format!("no share for {node}")))
        };
        let mut c_shared = BTreeMap::new();
        let mut out = Vec::with_capacity(u1.len().saturating_sub(1));
        for (v, keys) in &u1 {
            if *v == ctx.me {
                continue;
            }
            let shared = crypto::agree(&self.c_sk, &keys.c_pk, v)?;
            let ciphertext = crypto::seal_shares(
                ctx.session_id(),
                &shared,
                &ctx.me,
                v,
                &share_of(&s_shares, v)?,
                &share_of(&b_shares, v)?,
            )?;
            c_shared.insert(v.clone(), shared);
            out.push(EncryptedShares {
                from: ctx.me.clone(),
                to: v.clone(),
                ciphertext,
            });
        }
        let own_b = share_of(&b_shares, &ctx.me)?;
        let msg = ShareKeys {
            from: ctx.me.clone(),
            shares: out,
        };
        Ok((
            AwaitingShares {
                ctx,
                s_sk: self.s_sk,
                b_u,
                u1,
                c_shared,
                own_b,
            },
            msg,
        ))
    }
}

/// After R1: waiting for the peers' shares (U2).
pub struct AwaitingShares {
    ctx: Ctx,
    s_sk: StaticSecret,
    b_u: Zeroizing<[u8; 32]>,
    u1: BTreeMap<NodeId, AdvertiseKeys>,
    c_shared: BTreeMap<NodeId, Zeroizing<[u8; 32]>>,
    own_b: Share,
}

impl std::fmt::Debug for AwaitingShares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwaitingShares")
            .field("me", &self.ctx.me)
            .finish_non_exhaustive()
    }
}

impl AwaitingShares {
    /// R2, first half: open the shares addressed to this node, fix U2 (their senders and
    /// this node) and refuse |U2| < t_noise — before anything is spent.
    pub fn receive_shares(self, fwd: &ForwardedShares) -> Result<ReadyToCommit, SecAggError> {
        let ctx = self.ctx;
        let round = Round::MaskedInput;
        let my_x = ctx
            .facts
            .x_of(&ctx.me)
            .ok_or_else(|| SecAggError::NotInCohort(ctx.me.clone()))?;
        let mut held: BTreeMap<NodeId, (Share, Share)> = BTreeMap::new();
        for e in &fwd.shares {
            if e.to != ctx.me {
                return Err(SecAggError::Protocol {
                    round,
                    reason: format!("a forwarded ciphertext is addressed to {}", e.to),
                });
            }
            let shared = self
                .c_shared
                .get(&e.from)
                .ok_or_else(|| SecAggError::NotAMember {
                    round,
                    node: e.from.clone(),
                    set: "U1",
                })?;
            if held.contains_key(&e.from) {
                return Err(SecAggError::Duplicate {
                    round,
                    node: e.from.clone(),
                });
            }
            let (s, b) =
                crypto::open_shares(ctx.session_id(), shared, &e.from, &ctx.me, &e.ciphertext)?;
            if s.x() != my_x || b.x() != my_x {
                return Err(SecAggError::ShareDecrypt(e.from.clone()));
            }
            held.insert(e.from.clone(), (s, b));
        }
        ctx.need(round, held.len() + 1, ctx.params.t_noise)?;
        let mut u2: BTreeMap<NodeId, [u8; 32]> = held
            .keys()
            .filter_map(|v| self.u1.get(v).map(|k| (v.clone(), k.s_pk)))
            .collect();
        u2.insert(ctx.me.clone(), [0; 32]);
        Ok(ReadyToCommit {
            ctx,
            s_sk: self.s_sk,
            b_u: self.b_u,
            u2,
            held,
            own_b: self.own_b,
        })
    }
}

/// What the node must record durably (spend, participation, audit) before its masked input
/// exists.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendIntent {
    /// The store's new record for this query: [`crate::Stage::Spent`].
    pub participation: Participation,
    pub n: u32,
    /// |U2| as this node saw it.
    pub u2: usize,
    pub t_noise: u32,
    pub t_sss: u32,
    pub lattice: u64,
    pub sigma_share: f64,
    /// ρ if this node's y_u alone were unmasked (if secure aggregation were broken).
    pub rho_local: f64,
}

/// R2 checks passed: the node is about to commit its input.
pub struct ReadyToCommit {
    ctx: Ctx,
    s_sk: StaticSecret,
    b_u: Zeroizing<[u8; 32]>,
    /// U2 → s_pk (this node's entry is a placeholder, never used).
    u2: BTreeMap<NodeId, [u8; 32]>,
    held: BTreeMap<NodeId, (Share, Share)>,
    own_b: Share,
}

impl std::fmt::Debug for ReadyToCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadyToCommit")
            .field("me", &self.ctx.me)
            .finish_non_exhaustive()
    }
}

impl ReadyToCommit {
    /// What will be recorded.
    pub fn spend_intent(&self, prior: Option<&Participation>) -> Result<SpendIntent, SecAggError> {
        let participation = admit_spend(prior, &self.ctx.query_id, self.ctx.session_id())?;
        Ok(SpendIntent {
            participation,
            n: self.ctx.params.n,
            u2: self.u2.len(),
            t_noise: self.ctx.params.t_noise,
            t_sss: self.ctx.params.t_sss,
            lattice: self.ctx.params.lattice,
            sigma_share: self.ctx.params.sigma_share,
            rho_local: self.ctx.rho_local,
        })
    }

    /// The "about to commit" step: `record` must durably record the spend (and the
    /// participation at [`crate::Stage::Spent`]) and return `Ok` only once it is on disk.
    /// Only then does a [`Committed`] state exist, and only a `Committed` can produce y_u.
    /// If `record` fails, the session ends here and nothing is sent. `prior` is the store's
    /// record for the query, which must be this session at [`crate::Stage::Joined`].
    pub fn commit<E: From<SecAggError>>(
        self,
        prior: Option<&Participation>,
        record: impl FnOnce(&SpendIntent) -> Result<(), E>,
    ) -> Result<Committed, E> {
        let intent = self.spend_intent(prior)?;
        record(&intent)?;
        Ok(Committed { inner: self })
    }
}

/// The spend is on disk; the node may now run its engine (noise share included) and mask.
pub struct Committed {
    inner: ReadyToCommit,
}

impl std::fmt::Debug for Committed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committed")
            .field("me", &self.inner.ctx.me)
            .finish_non_exhaustive()
    }
}

impl Committed {
    /// R2, second half: y_u = enc(x_u) + PRG(b_u) + Σ_{v∈U2∖u} ±PRG(s_uv) mod 2^64, with +
    /// when u < v (node id order) and − otherwise, so the pairwise masks cancel in the sum.
    ///
    /// `noisy_lattice_input` is g·x_u plus this node's discrete Gaussian share, already
    /// sampled by the engine: this crate never samples noise. The s-key and b_u are wiped
    /// when this returns, whatever the result.
    pub fn mask(
        self,
        noisy_lattice_input: &[i64],
    ) -> Result<(AwaitingSurvivors, MaskedInput), SecAggError> {
        let r = self.inner;
        let ctx = r.ctx;
        let dim = ctx.params.dim();
        let mut y = ctx.params.encoding()?.encode(noisy_lattice_input)?;
        add_into(
            &mut y,
            &prg::self_mask(ctx.session_id(), &r.b_u, &ctx.me, dim),
        );
        for (v, s_pk) in &r.u2 {
            if *v == ctx.me {
                continue;
            }
            let shared = crypto::agree(&r.s_sk, s_pk, v)?;
            let mask = prg::pair_mask(ctx.session_id(), &shared, &ctx.me, v, dim);
            if ctx.me < *v {
                add_into(&mut y, &mask);
            } else {
                crate::encoding::sub_into(&mut y, &mask);
            }
        }
        let msg = MaskedInput {
            from: ctx.me.clone(),
            y,
        };
        let u2 = r.u2.into_keys().collect();
        Ok((
            AwaitingSurvivors {
                ctx,
                u2,
                held: r.held,
                own_b: r.own_b,
            },
            msg,
        ))
    }
}

/// After R2: waiting for the survivor set U3.
pub struct AwaitingSurvivors {
    ctx: Ctx,
    u2: BTreeSet<NodeId>,
    held: BTreeMap<NodeId, (Share, Share)>,
    own_b: Share,
}

impl std::fmt::Debug for AwaitingSurvivors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwaitingSurvivors")
            .field("me", &self.ctx.me)
            .finish_non_exhaustive()
    }
}

impl AwaitingSurvivors {
    /// R3: check U3 (⊆ U2 as this node saw it, containing this node, no repeats,
    /// |U3| ≥ t_noise) and sign it.
    pub fn consistency(
        self,
        me: &NodeIdentity,
        set: &SurvivorSet,
    ) -> Result<(AwaitingUnmask, ConsistencySig), SecAggError> {
        let ctx = self.ctx;
        ctx.check_me(me)?;
        let round = Round::Consistency;
        let mut u3: Vec<NodeId> = set.survivors.clone();
        u3.sort();
        if let Some(w) = u3.windows(2).find(|w| w[0] == w[1]) {
            return Err(SecAggError::Duplicate {
                round,
                node: w[0].clone(),
            });
        }
        if let Some(v) = u3.iter().find(|v| !self.u2.contains(*v)) {
            return Err(SecAggError::SurvivorNotInU2(v.clone()));
        }
        if !u3.contains(&ctx.me) {
            return Err(SecAggError::SelfNotInU3);
        }
        ctx.need(round, u3.len(), ctx.params.t_noise)?;
        let body = SurvivorSet::statement_body(&u3);
        let signature = me.sign_statement(Protocol::SecAgg, ctx.session_id(), U3_KIND, &body);
        let sig = ConsistencySig {
            from: ctx.me.clone(),
            signature,
        };
        Ok((
            AwaitingUnmask {
                ctx,
                u2: self.u2,
                u3,
                body,
                held: self.held,
                own_b: self.own_b,
            },
            sig,
        ))
    }
}

/// After R3: waiting for the others' signatures on U3.
pub struct AwaitingUnmask {
    ctx: Ctx,
    u2: BTreeSet<NodeId>,
    u3: Vec<NodeId>,
    body: Vec<u8>,
    held: BTreeMap<NodeId, (Share, Share)>,
    own_b: Share,
}

impl std::fmt::Debug for AwaitingUnmask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwaitingUnmask")
            .field("me", &self.ctx.me)
            .finish_non_exhaustive()
    }
}

impl AwaitingUnmask {
    /// The survivor set this node signed.
    pub fn survivors(&self) -> &[NodeId] {
        &self.u3
    }

    /// R4: with at least t_sss valid signatures, from members of U3, on exactly the U3 this
    /// node signed, reveal b-shares for U3 and s-shares for U2 ∖ U3. Any signature that does
    /// not verify aborts: it means the coordinator showed different survivor sets to
    /// different nodes, the one attack that could collect both shares of one node.
    ///
    /// The state is consumed, so shares are revealed at most once per session, and the two
    /// sets are disjoint by construction: no node's b- and s-shares ever both leave.
    pub fn unmask(self, req: &UnmaskRequest) -> Result<UnmaskShares, SecAggError> {
        let ctx = &self.ctx;
        let round = Round::Unmasking;
        // Defensive: R3 already refused this, but the rule is "never unmask a short sum".
        ctx.need(round, self.u3.len(), ctx.params.t_noise)?;
        let mut signers = BTreeSet::new();
        let mut checks = Vec::with_capacity(req.signatures.len());
        for s in &req.signatures {
            if self.u3.binary_search(&s.from).is_err() {
                return Err(SecAggError::NotAMember {
                    round,
                    node: s.from.clone(),
                    set: "U3",
                });
            }
            if !signers.insert(s.from.clone()) {
                return Err(SecAggError::Duplicate {
                    round,
                    node: s.from.clone(),
                });
            }
            let member = ctx
                .facts
                .member(&s.from)
                .ok_or_else(|| SecAggError::NotInCohort(s.from.clone()))?;
            checks.push(StatementCheck {
                signer: member,
                body: &self.body,
                signature: &s.signature,
            });
        }
        verify_statements(Protocol::SecAgg, ctx.session_id(), U3_KIND, &checks)
            .map_err(|i| SecAggError::InconsistentSurvivorSet(req.signatures[i].from.clone()))?;
        ctx.need(round, signers.len(), ctx.params.t_sss)?;
        let mut b_shares = Vec::with_capacity(self.u3.len());
        for v in &self.u3 {
            let share = if *v == ctx.me {
                self.own_b.clone()
            } else {
                self.held
                    .get(v)
                    .map(|(_, b)| b.clone())
                    .ok_or_else(|| SecAggError::SurvivorNotInU2(v.clone()))?
            };
            b_shares.push((v.clone(), share));
        }
        let mut s_shares = Vec::new();
        for v in self.u2.iter().filter(|v| self.u3.binary_search(v).is_err()) {
            // This node is in U3, so it is never here; its own s-share is never revealed.
            if let Some((s, _)) = self.held.get(v) {
                s_shares.push((v.clone(), s.clone()));
            }
        }
        Ok(UnmaskShares {
            from: ctx.me.clone(),
            b_shares,
            s_shares,
        })
    }
}
