//! Carrying the round messages as `phm-relay` sealed frames (`Protocol::Link`): one
//! [`LinkSession`] per (query, anchor, partner), and one [`Channel`] per node that
//! chunks a message into numbered frames through its `Outbox` and reassembles the peer's
//! through its `Inbox`.
//!
//! Rounds on the wire: round 1 carries `F` (partner → anchor) and `L` (anchor →
//! partner) at the same time; round 2 carries `R` (partner → anchor). So the anchor's
//! inbox expects rounds 1–2 from the partner and its outbox sends round 1 only; the
//! partner's are the mirror image. A channel fails closed: after any refused frame
//! (relay check or decoding) it refuses everything, and the caller aborts the session.

use phm_relay::{
    Inbox, NodeId, NodeIdentity, NodePublic, Outbox, Protocol, SealedFrame, SessionContext,
    VerifiedRegistry,
};

use crate::error::LinkError;
use crate::protocol::LinkParams;
use crate::wire::{Assembler, MessageKind, RoundF, RoundL, RoundR};

/// Round of `F` and `L`.
pub const ROUND_SETS: u32 = 1;
/// Round of `R`.
pub const ROUND_REPLY: u32 = 2;

/// Label of the role list in the session parameters.
const ROLES_LABEL: &[u8] = b"phm-link/v1 roles";

/// Which side of a session a node is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Anchor,
    Partner,
}

/// One linkage session: the names every frame of it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkSession {
    pub federation_id: String,
    pub query_digest: [u8; 32],
    pub session_id: [u8; 32],
    pub anchor: NodeId,
    pub partner: NodeId,
    params: LinkParams,
}

impl LinkSession {
    /// Derive the session from what each node verified itself: the query digest, the
    /// coordinator's nonce, both nodes' registered keys and the parameters. The roles are
    /// part of the session id, so the coordinator cannot tell both nodes they are anchors.
    pub fn new(
        registry: &VerifiedRegistry,
        query_digest: [u8; 32],
        session_nonce: &[u8],
        anchor: &NodePublic,
        partner: &NodePublic,
        params: &LinkParams,
    ) -> Result<LinkSession, LinkError> {
        let mut bound = Vec::new();
        for part in [
            ROLES_LABEL,
            anchor.node_id.as_str().as_bytes(),
            partner.node_id.as_str().as_bytes(),
            &params.canonical_bytes(),
        ] {
            bound.extend_from_slice(&(part.len() as u64).to_be_bytes());
            bound.extend_from_slice(part);
        }
        let session_id = phm_relay::session_id(
            Protocol::Link,
            &query_digest,
            session_nonce,
            [anchor, partner],
            &bound,
        )?;
        Ok(LinkSession {
            federation_id: registry.federation_id().to_owned(),
            query_digest,
            session_id,
            anchor: anchor.node_id.clone(),
            partner: partner.node_id.clone(),
            params: params.clone(),
        })
    }

    fn context(&self, first_round: u32, last_round: u32) -> SessionContext {
        SessionContext {
            protocol: Protocol::Link,
            federation_id: self.federation_id.clone(),
            query_digest: self.query_digest,
            session_id: self.session_id,
            first_round,
            last_round,
        }
    }

    /// The channel of `me` in `role`.
    pub fn channel(&self, me: &NodeIdentity, role: Role) -> Result<Channel, LinkError> {
        let (mine, peer, inbox_last, outbox_last) = match role {
            Role::Anchor => (&self.anchor, &self.partner, ROUND_REPLY, ROUND_SETS),
            Role::Partner => (&self.partner, &self.anchor, ROUND_SETS, ROUND_REPLY),
        };
        if me.node_id() != mine {
            return Err(LinkError::Params(format!(
                "this node is {}, but the session's {role:?} is {mine}",
                me.node_id()
            )));
        }
        let peers = [peer.clone()];
        Ok(Channel {
            role,
            peer: peer.clone(),
            params: self.params.clone(),
            inbox: Inbox::new(self.context(ROUND_SETS, inbox_last), me, &peers)?,
            outbox: Outbox::new(self.context(ROUND_SETS, outbox_last), me, &peers)?,
            assembling: None,
            failed: false,
            per_chunk: crate::wire::MAX_CHUNK_ELEMENTS,
        })
    }
}

/// A complete message from the peer.
#[derive(Debug)]
pub enum Incoming {
    F(RoundF),
    L(RoundL),
    R(RoundR),
}

/// One node's end of a session: sends its messages as frames and reassembles the peer's.
#[derive(Debug)]
pub struct Channel {
    role: Role,
    peer: NodeId,
    params: LinkParams,
    inbox: Inbox,
    outbox: Outbox,
    assembling: Option<(u32, Assembler)>,
    failed: bool,
    /// Points per frame: [`crate::MAX_CHUNK_ELEMENTS`], smaller only in tests.
    per_chunk: usize,
}

impl Channel {
    /// Seal a message's chunks to the peer as frames of `round`, the last one marked
    /// `last`. Use [`Channel::send_l`], [`Channel::send_f`] or [`Channel::send_r`].
    fn send(
        &mut self,
        me: &NodeIdentity,
        registry: &VerifiedRegistry,
        round: u32,
        chunks: Vec<Vec<u8>>,
    ) -> Result<Vec<SealedFrame>, LinkError> {
        let n = chunks.len();
        chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                self.outbox
                    .seal(me, registry, &self.peer, round, i + 1 == n, c)
                    .map_err(LinkError::from)
            })
            .collect()
    }

    /// Anchor, round 1.
    pub fn send_l(
        &mut self,
        me: &NodeIdentity,
        registry: &VerifiedRegistry,
        l: &RoundL,
    ) -> Result<Vec<SealedFrame>, LinkError> {
        self.must_be(Role::Anchor)?;
        self.send(me, registry, ROUND_SETS, l.chunks_of(self.per_chunk))
    }

    /// Partner, round 1.
    pub fn send_f(
        &mut self,
        me: &NodeIdentity,
        registry: &VerifiedRegistry,
        f: &RoundF,
    ) -> Result<Vec<SealedFrame>, LinkError> {
        self.must_be(Role::Partner)?;
        self.send(me, registry, ROUND_SETS, f.chunks_of(self.per_chunk))
    }

    /// Partner, round 2.
    pub fn send_r(
        &mut self,
        me: &NodeIdentity,
        registry: &VerifiedRegistry,
        r: &RoundR,
    ) -> Result<Vec<SealedFrame>, LinkError> {
        self.must_be(Role::Partner)?;
        self.send(me, registry, ROUND_REPLY, r.chunks_of(self.per_chunk))
    }

    fn must_be(&self, role: Role) -> Result<(), LinkError> {
        if self.role == role {
            Ok(())
        } else {
            Err(LinkError::Params(format!(
                "this channel is the {:?}'s; that message is the {role:?}'s",
                self.role
            )))
        }
    }

    /// Accept one frame from the relay. Returns the peer's message once its round's
    /// `last` frame has arrived, `None` before. Any refusal is final.
    pub fn accept(
        &mut self,
        me: &NodeIdentity,
        registry: &VerifiedRegistry,
        frame: &SealedFrame,
    ) -> Result<Option<Incoming>, LinkError> {
        if self.failed {
            return Err(LinkError::Relay(phm_relay::RelayError::SessionAborted(
                "an earlier frame of this session was refused".into(),
            )));
        }
        let result = self.accept_inner(me, registry, frame);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn accept_inner(
        &mut self,
        me: &NodeIdentity,
        registry: &VerifiedRegistry,
        frame: &SealedFrame,
    ) -> Result<Option<Incoming>, LinkError> {
        let delivered = self.inbox.accept(me, registry, frame)?;
        let round = delivered.header.round;
        let groups = u32::try_from(self.params.groups).unwrap_or(u32::MAX);
        let (kind, max) = match (self.role, round) {
            (Role::Anchor, ROUND_SETS) => (MessageKind::BlindedSet, self.params.max_f()),
            (Role::Anchor, _) => (MessageKind::Reply, self.params.max_r()),
            (Role::Partner, _) => (MessageKind::AnchorSet, self.params.max_l()),
        };
        let assembler = match &mut self.assembling {
            Some((r, a)) if *r == round => a,
            _ => {
                let g = if kind == MessageKind::BlindedSet {
                    1
                } else {
                    groups
                };
                &mut self
                    .assembling
                    .insert((round, Assembler::new(kind, g, max)))
                    .1
            }
        };
        assembler.push(&delivered.plaintext)?;
        if !delivered.round_complete {
            return Ok(None);
        }
        let Some((_, done)) = self.assembling.take() else {
            return Err(LinkError::Incomplete);
        };
        Ok(Some(match done.kind() {
            MessageKind::BlindedSet => Incoming::F(done.finish_f()?),
            MessageKind::AnchorSet => Incoming::L(done.finish_l()?),
            MessageKind::Reply => Incoming::R(done.finish_r()?),
        }))
    }

    /// Send at most `per_chunk` points per frame, to exercise chunking in tests.
    #[cfg(test)]
    pub(crate) fn set_chunk_size(&mut self, per_chunk: usize) {
        self.per_chunk = per_chunk;
    }

    /// Whether the peer has sent everything it will send in this session.
    pub fn is_complete(&self) -> bool {
        self.inbox.is_complete()
    }
}
