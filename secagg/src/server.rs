//! The coordinator's side of a session: collect each round's messages, fix the sets U1 ⊆
//! … ⊆ U5, forward, and at the end reconstruct and strip the masks and decode the total.
//!
//! The coordinator is untrusted: nothing here is needed for the nodes' privacy, which rests
//! on the nodes' own checks (`client`). This side checks what an honest coordinator should
//! (signatures, set membership, exactly the expected shares) so that one misbehaving node
//! is dropped instead of sinking the session, and it refuses to unmask a sum of fewer than
//! t_noise inputs. It never sees an individual input: only masked vectors and the total.

use std::collections::{BTreeMap, BTreeSet};

use phm_relay::{NodeId, Protocol, VerifyingKey};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::crypto::{self, Share};
use crate::encoding::{add_into, sub_into};
use crate::error::{Round, SecAggError};
use crate::messages::{
    AdvertiseKeys, ConsistencySig, ForwardedShares, KEYS_KIND, MaskedInput, PeerKeys, ShareKeys,
    SurvivorSet, U3_KIND, UnmaskRequest, UnmaskShares,
};
use crate::params::{Begin, SessionFacts, SessionParams};
use crate::prg;

/// Which messages the server is collecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Keys,
    Shares,
    Masked,
    Signatures,
    Unmask,
}

impl Phase {
    fn round(self) -> Round {
        match self {
            Phase::Keys => Round::AdvertiseKeys,
            Phase::Shares => Round::ShareKeys,
            Phase::Masked => Round::MaskedInput,
            Phase::Signatures => Round::Consistency,
            Phase::Unmask => Round::Unmasking,
        }
    }
}

/// The unmasked result.
#[derive(Debug, Clone, PartialEq)]
pub struct Total {
    /// Σ_{u∈U3} of the nodes' noisy lattice inputs, decoded to signed integers.
    pub lattice_values: Vec<i64>,
    /// The same in original units (z / g · γ).
    pub values: Vec<f64>,
    /// U3: whose inputs (and noise shares) the total holds.
    pub survivors: Vec<NodeId>,
    /// Cohort members not in U3, for the coverage note.
    pub dropped: Vec<NodeId>,
}

/// One session as the coordinator runs it.
#[derive(Debug)]
pub struct Server {
    facts: SessionFacts,
    params: SessionParams,
    phase: Phase,
    keys: BTreeMap<NodeId, AdvertiseKeys>,
    shares: BTreeMap<NodeId, ShareKeys>,
    u2: BTreeSet<NodeId>,
    masked: BTreeMap<NodeId, Vec<u64>>,
    u3: Vec<NodeId>,
    sigs: BTreeMap<NodeId, [u8; 64]>,
    unmask: BTreeMap<NodeId, UnmaskShares>,
}

impl Server {
    /// Open a session from the [`Begin`] it will send: verifies the registry under the
    /// federation's registry key and derives the same session id the nodes will.
    pub fn new(
        begin: &Begin,
        registry_key: &VerifyingKey,
        now_ms: u64,
    ) -> Result<Server, SecAggError> {
        let facts = SessionFacts::derive(begin, registry_key, now_ms)?;
        Ok(Server {
            facts,
            params: begin.params.clone(),
            phase: Phase::Keys,
            keys: BTreeMap::new(),
            shares: BTreeMap::new(),
            u2: BTreeSet::new(),
            masked: BTreeMap::new(),
            u3: Vec::new(),
            sigs: BTreeMap::new(),
            unmask: BTreeMap::new(),
        })
    }

    /// The session id.
    pub fn session_id(&self) -> [u8; 32] {
        self.facts.session_id
    }

    fn expect(&self, phase: Phase) -> Result<(), SecAggError> {
        if self.phase != phase {
            return Err(SecAggError::Protocol {
                round: phase.round(),
                reason: format!("the session is collecting {} messages", self.phase.round()),
            });
        }
        Ok(())
    }

    fn need(round: Round, have: usize, need: u32) -> Result<(), SecAggError> {
        if have < need as usize {
            return Err(SecAggError::TooFewSurvivors {
                round,
                have,
                need: need as usize,
            });
        }
        Ok(())
    }

    fn sender(round: Round, from: &NodeId, claimed: &NodeId) -> Result<(), SecAggError> {
        if from != claimed {
            return Err(SecAggError::Protocol {
                round,
                reason: format!("a message on {from}'s stream claims to be from {claimed}"),
            });
        }
        Ok(())
    }

    /// R0: one node's keys (`from` is the stream's authenticated node).
    pub fn receive_keys(&mut self, from: &NodeId, msg: AdvertiseKeys) -> Result<(), SecAggError> {
        let round = Round::AdvertiseKeys;
        self.expect(Phase::Keys)?;
        Self::sender(round, from, &msg.node)?;
        let member = self
            .facts
            .member(from)
            .ok_or_else(|| SecAggError::NotAMember {
                round,
                node: from.clone(),
                set: "the cohort",
            })?;
        if self.keys.contains_key(from) {
            return Err(SecAggError::Duplicate {
                round,
                node: from.clone(),
            });
        }
        member
            .verify_statement(
                Protocol::SecAgg,
                &self.facts.session_id,
                KEYS_KIND,
                &AdvertiseKeys::statement_body(&msg.c_pk, &msg.s_pk),
                &msg.signature,
            )
            .map_err(|_| SecAggError::KeySignature(from.clone()))?;
        self.keys.insert(from.clone(), msg);
        Ok(())
    }

    /// End R0: U1 is everyone whose keys arrived; the same list goes to every member.
    pub fn close_keys(&mut self) -> Result<PeerKeys, SecAggError> {
        self.expect(Phase::Keys)?;
        Self::need(Round::AdvertiseKeys, self.keys.len(), self.params.t_noise)?;
        self.phase = Phase::Shares;
        Ok(PeerKeys {
            keys: self.keys.values().cloned().collect(),
        })
    }

    /// U1.
    pub fn u1(&self) -> Vec<NodeId> {
        self.keys.keys().cloned().collect()
    }

    /// R1: one node's encrypted shares, which must address every other member of U1 once.
    pub fn receive_shares(&mut self, from: &NodeId, msg: ShareKeys) -> Result<(), SecAggError> {
        let round = Round::ShareKeys;
        self.expect(Phase::Shares)?;
        Self::sender(round, from, &msg.from)?;
        if !self.keys.contains_key(from) {
            return Err(SecAggError::NotAMember {
                round,
                node: from.clone(),
                set: "U1",
            });
        }
        if self.shares.contains_key(from) {
            return Err(SecAggError::Duplicate {
                round,
                node: from.clone(),
            });
        }
        let to: BTreeSet<&NodeId> = msg.shares.iter().map(|e| &e.to).collect();
        let others: BTreeSet<&NodeId> = self.keys.keys().filter(|v| *v != from).collect();
        if to != others
            || msg.shares.len() != others.len()
            || msg.shares.iter().any(|e| e.from != *from)
        {
            return Err(SecAggError::Protocol {
                round,
                reason: format!(
                    "{from}'s shares do not address every other member of U1 exactly once"
                ),
            });
        }
        self.shares.insert(from.clone(), msg);
        Ok(())
    }

    /// End R1: U2 is everyone whose shares arrived; each member of U2 gets the ciphertexts
    /// addressed to it from the other members of U2.
    pub fn close_shares(&mut self) -> Result<BTreeMap<NodeId, ForwardedShares>, SecAggError> {
        self.expect(Phase::Shares)?;
        Self::need(Round::ShareKeys, self.shares.len(), self.params.t_noise)?;
        self.u2 = self.shares.keys().cloned().collect();
        let mut out: BTreeMap<NodeId, ForwardedShares> = self
            .u2
            .iter()
            .map(|v| (v.clone(), ForwardedShares { shares: Vec::new() }))
            .collect();
        for msg in self.shares.values() {
            for e in &msg.shares {
                if let Some(f) = out.get_mut(&e.to) {
                    f.shares.push(e.clone());
                }
            }
        }
        self.phase = Phase::Masked;
        Ok(out)
    }

    /// U2.
    pub fn u2(&self) -> Vec<NodeId> {
        self.u2.iter().cloned().collect()
    }

    /// R2: one node's masked input.
    pub fn receive_masked(&mut self, from: &NodeId, msg: MaskedInput) -> Result<(), SecAggError> {
        let round = Round::MaskedInput;
        self.expect(Phase::Masked)?;
        Self::sender(round, from, &msg.from)?;
        if !self.u2.contains(from) {
            return Err(SecAggError::NotAMember {
                round,
                node: from.clone(),
                set: "U2",
            });
        }
        if self.masked.contains_key(from) {
            return Err(SecAggError::Duplicate {
                round,
                node: from.clone(),
            });
        }
        if msg.y.len() != self.params.dim() {
            return Err(SecAggError::Dimension {
                expected: self.params.dim(),
                got: msg.y.len(),
            });
        }
        self.masked.insert(from.clone(), msg.y);
        Ok(())
    }

    /// End R2: U3 is everyone whose masked input arrived. Refuses (and the session ends,
    /// with nothing unmasked) if |U3| < t_noise: that sum would carry less noise than
    /// promised.
    pub fn close_masked(&mut self) -> Result<SurvivorSet, SecAggError> {
        self.expect(Phase::Masked)?;
        Self::need(Round::MaskedInput, self.masked.len(), self.params.t_noise)?;
        self.u3 = self.masked.keys().cloned().collect();
        self.phase = Phase::Signatures;
        Ok(SurvivorSet {
            survivors: self.u3.clone(),
        })
    }

    /// R3: one node's signature on U3.
    pub fn receive_signature(
        &mut self,
        from: &NodeId,
        msg: ConsistencySig,
    ) -> Result<(), SecAggError> {
        let round = Round::Consistency;
        self.expect(Phase::Signatures)?;
        Self::sender(round, from, &msg.from)?;
        if self.u3.binary_search(from).is_err() {
            return Err(SecAggError::NotAMember {
                round,
                node: from.clone(),
                set: "U3",
            });
        }
        if self.sigs.contains_key(from) {
            return Err(SecAggError::Duplicate {
                round,
                node: from.clone(),
            });
        }
        let member = self
            .facts
            .member(from)
            .ok_or_else(|| SecAggError::NotInCohort(from.clone()))?;
        member
            .verify_statement(
                Protocol::SecAgg,
                &self.facts.session_id,
                U3_KIND,
                &SurvivorSet::statement_body(&self.u3),
                &msg.signature,
            )
            .map_err(|_| SecAggError::InconsistentSurvivorSet(from.clone()))?;
        self.sigs.insert(from.clone(), msg.signature);
        Ok(())
    }

    /// End R3: U4 is everyone who signed; at least t_sss are needed.
    pub fn close_signatures(&mut self) -> Result<UnmaskRequest, SecAggError> {
        self.expect(Phase::Signatures)?;
        Self::need(Round::Consistency, self.sigs.len(), self.params.t_sss)?;
        self.phase = Phase::Unmask;
        Ok(UnmaskRequest {
            signatures: self
                .sigs
                .iter()
                .map(|(from, signature)| ConsistencySig {
                    from: from.clone(),
                    signature: *signature,
                })
                .collect(),
        })
    }

    /// R4: one node's revealed shares: b-shares for exactly U3, s-shares for exactly
    /// U2 ∖ U3, each at the sender's x-coordinate.
    pub fn receive_unmask(&mut self, from: &NodeId, msg: UnmaskShares) -> Result<(), SecAggError> {
        let round = Round::Unmasking;
        self.expect(Phase::Unmask)?;
        Self::sender(round, from, &msg.from)?;
        if !self.sigs.contains_key(from) {
            return Err(SecAggError::NotAMember {
                round,
                node: from.clone(),
                set: "U4",
            });
        }
        if self.unmask.contains_key(from) {
            return Err(SecAggError::Duplicate {
                round,
                node: from.clone(),
            });
        }
        let x = self
            .facts
            .x_of(from)
            .ok_or_else(|| SecAggError::NotInCohort(from.clone()))?;
        let b: Vec<&NodeId> = msg.b_shares.iter().map(|(v, _)| v).collect();
        let dropped: Vec<&NodeId> = self
            .u2
            .iter()
            .filter(|v| self.u3.binary_search(v).is_err())
            .collect();
        let s: Vec<&NodeId> = msg.s_shares.iter().map(|(v, _)| v).collect();
        let all_at_x = msg
            .b_shares
            .iter()
            .chain(&msg.s_shares)
            .all(|(_, sh)| sh.x() == x);
        if b != self.u3.iter().collect::<Vec<_>>() || s != dropped || !all_at_x {
            return Err(SecAggError::UnexpectedShares(from.clone()));
        }
        self.unmask.insert(from.clone(), msg);
        Ok(())
    }

    /// End R4: with at least t_sss responses, reconstruct b_u for u ∈ U3 and s_u^SK for
    /// u ∈ U2 ∖ U3 (checked against the advertised s_pk), strip every mask and decode.
    pub fn finish(self) -> Result<Total, SecAggError> {
        self.expect(Phase::Unmask)?;
        let round = Round::Unmasking;
        Self::need(round, self.unmask.len(), self.params.t_sss)?;
        // Defensive: close_masked already refused this.
        Self::need(round, self.u3.len(), self.params.t_noise)?;
        let t = self.params.t_sss as usize;
        let dim = self.params.dim();
        let sid = self.facts.session_id;
        let mut total = vec![0u64; dim];
        for y in self.masked.values() {
            add_into(&mut total, y);
        }
        let shares_of = |node: &NodeId, b: bool| -> Vec<&Share> {
            self.unmask
                .values()
                .filter_map(|m| {
                    let list = if b { &m.b_shares } else { &m.s_shares };
                    list.iter().find(|(v, _)| v == node).map(|(_, s)| s)
                })
                .take(t)
                .collect()
        };
        for u in &self.u3 {
            let b_u = crypto::combine(&shares_of(u, true)).map_err(|reason| {
                SecAggError::Reconstruction {
                    node: u.clone(),
                    what: "self-mask seed",
                    reason,
                }
            })?;
            sub_into(&mut total, &prg::self_mask(&sid, &b_u, u, dim));
        }
        for u in self.u2.iter().filter(|v| self.u3.binary_search(v).is_err()) {
            let rec = |reason: String| SecAggError::Reconstruction {
                node: u.clone(),
                what: "mask key",
                reason,
            };
            let bytes = crypto::combine(&shares_of(u, false)).map_err(rec)?;
            let sk = StaticSecret::from(*bytes);
            let advertised = self
                .keys
                .get(u)
                .map(|k| k.s_pk)
                .ok_or_else(|| rec("no advertised key".into()))?;
            if PublicKey::from(&sk).to_bytes() != advertised {
                return Err(rec(
                    "the shares give another key than the advertised one".into()
                ));
            }
            for v in &self.u3 {
                let s_pk = self
                    .keys
                    .get(v)
                    .map(|k| k.s_pk)
                    .ok_or_else(|| rec("no advertised key".into()))?;
                let shared = crypto::agree(&sk, &s_pk, v)?;
                let mask = prg::pair_mask(&sid, &shared, u, v, dim);
                // v added +mask if v < u, −mask otherwise: undo it.
                if v < u {
                    sub_into(&mut total, &mask);
                } else {
                    add_into(&mut total, &mask);
                }
            }
        }
        let encoding = self.params.encoding()?;
        let lattice_values = encoding.decode(&total)?;
        let values = encoding.to_real(&lattice_values)?;
        let dropped = self
            .facts
            .cohort
            .iter()
            .map(|p| p.node_id.clone())
            .filter(|id| self.u3.binary_search(id).is_err())
            .collect();
        Ok(Total {
            lattice_values,
            values,
            survivors: self.u3,
            dropped,
        })
    }
}
