//! Per-session order and replay protection: the receiver's [`Inbox`] and the sender's
//! [`Outbox`].
//!
//! Every sender's frames to one recipient in one session form a single sequence with no
//! gaps: round `first_round` seq 0, 1, …, up to the frame marked `last`, then round
//! `first_round + 1` from seq 0, and so on to `last_round`, after whose `last` frame
//! nothing more is accepted. So the inbox predicts exactly one acceptable position per
//! sender, and anything else is refused: a replay (a position already passed, in this
//! round or an earlier one), a drop or reorder (a position ahead), a frame after the end.
//! A sender with nothing to say in a round sends one empty frame marked `last`, so that a
//! round the coordinator withheld is told apart from an empty one.
//!
//! Fail closed: after refusing one frame the inbox refuses every later one, and the
//! protocol aborts the session (budget already spent stays spent).

use std::collections::BTreeMap;

use zeroize::Zeroizing;

use crate::error::RelayError;
use crate::frame::{Header, Protocol, SealedFrame, authenticate, decrypt, seal};
use crate::identity::{NodeId, NodeIdentity, shorten};
use crate::registry::VerifiedRegistry;

/// What every frame of one session must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionContext {
    pub protocol: Protocol,
    pub federation_id: String,
    pub query_digest: [u8; 32],
    /// From [`crate::session_id`], recomputed by this node.
    pub session_id: [u8; 32],
    /// The first round in which peers send to this node.
    pub first_round: u32,
    /// The last such round, inclusive.
    pub last_round: u32,
}

/// The next position a sender may use, or the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    Next { round: u32, seq: u32 },
    Done,
}

impl Position {
    /// The position after a frame at (round, seq, last).
    fn after(round: u32, seq: u32, last: bool, last_round: u32) -> Option<Position> {
        if last {
            if round == last_round {
                Some(Position::Done)
            } else {
                round
                    .checked_add(1)
                    .map(|round| Position::Next { round, seq: 0 })
            }
        } else {
            seq.checked_add(1).map(|seq| Position::Next { round, seq })
        }
    }
}

/// Where one sender is: its next position, and the final seq of each round it has ended
/// (to tell a frame after `last` from a replay).
#[derive(Debug, Clone)]
struct PeerState {
    next: Position,
    ended: Vec<(u32, u32)>,
}

fn check_context(
    ctx: &SessionContext,
    me: &NodeId,
    peers: &[NodeId],
) -> Result<BTreeMap<NodeId, PeerState>, RelayError> {
    crate::identity::validate_federation_id(&ctx.federation_id)?;
    if ctx.first_round > ctx.last_round {
        return Err(RelayError::InvalidSession(format!(
            "first round {} is after last round {}",
            ctx.first_round, ctx.last_round
        )));
    }
    let mut map = BTreeMap::new();
    for p in peers {
        if p == me {
            return Err(RelayError::InvalidSession(format!(
                "{me} cannot be its own peer"
            )));
        }
        let start = Position::Next {
            round: ctx.first_round,
            seq: 0,
        };
        let state = PeerState {
            next: start,
            ended: Vec::new(),
        };
        if map.insert(p.clone(), state).is_some() {
            return Err(RelayError::DuplicateCohortMember(p.clone()));
        }
    }
    Ok(map)
}

/// One frame accepted by an [`Inbox`].
#[derive(Debug)]
pub struct Delivered {
    pub header: Header,
    pub plaintext: Zeroizing<Vec<u8>>,
    /// This was the sender's `last` frame of its round.
    pub round_complete: bool,
}

/// A receiver's view of one session: which peers may send, and where each one is.
#[derive(Debug)]
pub struct Inbox {
    ctx: SessionContext,
    me: NodeId,
    peers: BTreeMap<NodeId, PeerState>,
    aborted: Option<String>,
}

impl Inbox {
    /// An inbox for `me` in the session `ctx`, accepting frames from `peers` only.
    pub fn new(
        ctx: SessionContext,
        me: &NodeIdentity,
        peers: &[NodeId],
    ) -> Result<Inbox, RelayError> {
        let peers = check_context(&ctx, me.node_id(), peers)?;
        Ok(Inbox {
            ctx,
            me: me.node_id().clone(),
            peers,
            aborted: None,
        })
    }

    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Accept the next frame. In order: the checks of [`crate::open`] up to the signature
    /// (size cap, recipient, federation, sender registered, signature by its registered
    /// key); then this session's (protocol, federation, query, session id, sender a peer,
    /// round in range, exactly the expected position); then decryption. The position
    /// advances only for a frame that decrypted, and any refusal aborts the inbox.
    ///
    /// Refusals up to [`RelayError::BadSignature`] concern frames nobody is known to have
    /// sent; later ones concern frames their sender did sign, so they point at the relay
    /// (or at a sender that misnumbers its own frames).
    pub fn accept(
        &mut self,
        me: &NodeIdentity,
        registry: &VerifiedRegistry,
        frame: &SealedFrame,
    ) -> Result<Delivered, RelayError> {
        if let Some(why) = &self.aborted {
            return Err(RelayError::SessionAborted(why.clone()));
        }
        match self.accept_inner(me, registry, frame) {
            Ok(d) => Ok(d),
            Err(e) => {
                self.aborted = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn accept_inner(
        &mut self,
        me: &NodeIdentity,
        registry: &VerifiedRegistry,
        frame: &SealedFrame,
    ) -> Result<Delivered, RelayError> {
        let h = frame.header();
        let ctx = &self.ctx;
        if me.node_id() != &self.me {
            return Err(RelayError::InvalidSession(format!(
                "this inbox is {}'s, not {}'s",
                self.me,
                me.node_id()
            )));
        }
        // Authenticate first (size cap, recipient, registry, signature), so that every
        // refusal below is about a frame its sender really signed: a splice or a replay by
        // whoever relayed it, not a forgery. Decryption waits until the position is right.
        authenticate(me, registry, frame)?;
        if h.protocol != ctx.protocol {
            return Err(RelayError::WrongProtocol {
                expected: ctx.protocol,
                got: h.protocol,
            });
        }
        if h.federation_id != ctx.federation_id {
            return Err(RelayError::WrongFederation {
                expected: ctx.federation_id.clone(),
                got: shorten(&h.federation_id),
            });
        }
        if h.query_digest != ctx.query_digest {
            return Err(RelayError::WrongQuery {
                from: h.from.clone(),
            });
        }
        if h.session_id != ctx.session_id {
            return Err(RelayError::WrongSession {
                from: h.from.clone(),
            });
        }
        let state = self
            .peers
            .get(&h.from)
            .ok_or_else(|| RelayError::NotAPeer(h.from.clone()))?
            .clone();
        if h.round < ctx.first_round || h.round > ctx.last_round {
            return Err(RelayError::RoundOutOfRange {
                from: h.from.clone(),
                round: h.round,
                first: ctx.first_round,
                last: ctx.last_round,
            });
        }
        let expected = match state.next {
            Position::Next { round, seq } => Some((round, seq)),
            Position::Done => None,
        };
        if expected != Some((h.round, h.seq)) {
            return Err(classify(h, &state, expected));
        }
        let next = Position::after(h.round, h.seq, h.last, ctx.last_round).ok_or_else(|| {
            RelayError::SequenceExhausted {
                from: h.from.clone(),
                seq: h.seq,
            }
        })?;

        let plaintext = decrypt(me, frame)?;
        let mut state = state;
        if h.last {
            state.ended.push((h.round, h.seq));
        }
        state.next = next;
        self.peers.insert(h.from.clone(), state);
        Ok(Delivered {
            header: h.clone(),
            plaintext,
            round_complete: h.last,
        })
    }

    /// Whether `peer`'s frames for `round` have all arrived (its `last` frame was accepted).
    pub fn is_round_complete(&self, peer: &NodeId, round: u32) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|s| s.ended.iter().any(|(r, _)| *r == round))
    }

    /// Whether every peer's `round` is complete.
    pub fn is_round_complete_for_all(&self, round: u32) -> bool {
        self.peers.keys().all(|p| self.is_round_complete(p, round))
    }

    /// Whether every peer has sent its last frame of the last round.
    pub fn is_complete(&self) -> bool {
        self.peers.values().all(|p| p.next == Position::Done)
    }

    /// The reason the inbox refused a frame, if it did.
    pub fn aborted(&self) -> Option<&str> {
        self.aborted.as_deref()
    }
}

/// Why a frame at the wrong position is wrong, for the audit entry.
fn classify(h: &Header, state: &PeerState, expected: Option<(u32, u32)>) -> RelayError {
    let from = h.from.clone();
    let (round, seq) = (h.round, h.seq);
    // Past the `last` frame of a round that has ended.
    if let Some(&(_, last_seq)) = state.ended.iter().find(|(r, _)| *r == round) {
        if seq > last_seq {
            return RelayError::AfterLast { from, round, seq };
        }
        return RelayError::Replayed { from, round, seq };
    }
    match expected {
        Some(e) if (round, seq) < e => RelayError::Replayed { from, round, seq },
        Some((expected_round, expected_seq)) => RelayError::OutOfOrder {
            from,
            round,
            seq,
            expected_round,
            expected_seq,
        },
        // Every round has ended once the sender is done, so the lookup above answered.
        None => RelayError::AfterLast { from, round, seq },
    }
}

/// A sender's side of one session: numbers its frames to each peer so that they are exactly
/// what the peer's [`Inbox`] expects.
#[derive(Debug)]
pub struct Outbox {
    ctx: SessionContext,
    me: NodeId,
    peers: BTreeMap<NodeId, PeerState>,
}

impl Outbox {
    /// An outbox for `me` in the session `ctx`, sending to `peers`.
    pub fn new(
        ctx: SessionContext,
        me: &NodeIdentity,
        peers: &[NodeId],
    ) -> Result<Outbox, RelayError> {
        let peers = check_context(&ctx, me.node_id(), peers)?;
        Ok(Outbox {
            ctx,
            me: me.node_id().clone(),
            peers,
        })
    }

    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Seal the next frame of `round` to `to`, under the HPKE key the verified registry
    /// lists for it; `last` ends this node's round to it.
    /// Refuses a round other than the recipient's current one (an earlier round, or a later
    /// one before this one ended with `last`).
    pub fn seal(
        &mut self,
        me: &NodeIdentity,
        registry: &VerifiedRegistry,
        to: &NodeId,
        round: u32,
        last: bool,
        plaintext: &[u8],
    ) -> Result<SealedFrame, RelayError> {
        if me.node_id() != &self.me {
            return Err(RelayError::InvalidSession(format!(
                "this outbox is {}'s, not {}'s",
                self.me,
                me.node_id()
            )));
        }
        let position = self
            .peers
            .get(to)
            .ok_or_else(|| RelayError::NotAPeer(to.clone()))?
            .next;
        let refuse = |reason| RelayError::SendOutOfOrder {
            to: to.clone(),
            round,
            reason,
        };
        let seq = match position {
            Position::Done => {
                return Err(refuse(
                    "this node already sent its last frame of the last round",
                ));
            }
            Position::Next { round: r, seq } if r == round => seq,
            Position::Next { round: r, .. } if r > round => {
                return Err(refuse("that round is already complete"));
            }
            Position::Next { .. } => {
                return Err(refuse("the current round has not been ended with `last`"));
            }
        };
        let next = Position::after(round, seq, last, self.ctx.last_round).ok_or(
            RelayError::SequenceExhausted {
                from: self.me.clone(),
                seq,
            },
        )?;
        let header = Header {
            protocol: self.ctx.protocol,
            federation_id: self.ctx.federation_id.clone(),
            query_digest: self.ctx.query_digest,
            session_id: self.ctx.session_id,
            from: self.me.clone(),
            to: to.clone(),
            round,
            seq,
            last,
        };
        // The recipient's key comes from the verified registry, never from the relay.
        let recipient = registry
            .get(to)
            .ok_or_else(|| RelayError::NotInRegistry(to.clone()))?;
        let frame = seal(me, recipient, header, plaintext)?;
        if let Some(state) = self.peers.get_mut(to) {
            if last {
                state.ended.push((round, seq));
            }
            state.next = next;
        }
        Ok(frame)
    }
}
