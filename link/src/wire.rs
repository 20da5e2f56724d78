//! The three round messages and their canonical byte encoding, in chunks that each fit
//! one sealed frame.
//!
//! A message is sent as one or more *chunks*, each the whole plaintext of one
//! `phm-relay` frame; the frame marked `last` ends it. Every chunk is
//!
//! ```text
//! u8  version (1)         u8  kind (1 = F, 2 = L, 3 = R)
//! u32 groups (F: 1)       u32 chunk index (0, 1, …)
//! L only: u8 has_key (1 in chunk 0, else 0), then the 32-byte key share P if present
//! u32 segments, each:  u32 group, u32 count (≥ 1), count × 32-byte compressed points
//! ```
//!
//! with integers big-endian, groups in order (strictly within a chunk; a group may
//! continue into the next chunk), at most [`MAX_CHUNK_ELEMENTS`] points per chunk and no
//! trailing bytes. There is exactly one encoding of a message for a given chunking, and
//! the sender's chunking is a fixed function of the group sizes ([`RoundF::to_chunks`]),
//! so frame sizes reveal only the padded sizes.
//!
//! The decoder refuses anything an honest peer would never send: a non-canonical or
//! identity point, a repeated point (hashes and random points collide with negligible
//! probability), a group out of range, more elements than the caller's cap. Points are
//! decompressed once, on receipt, and kept decompressed where the receiver multiplies
//! them (F at the anchor, L at the partner).

use std::collections::HashSet;
use std::fmt;

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::traits::IsIdentity as _;

use crate::error::DecodeError;

/// Encoding version of every chunk.
pub const VERSION: u8 = 1;
/// Most points in one chunk (so one frame): 64Ki × 32 bytes = 2 MiB, well inside the
/// relay's 4 MiB frame cap.
pub const MAX_CHUNK_ELEMENTS: usize = 1 << 16;

const POINT_LEN: usize = 32;

/// Which round message a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Round 1, partner → anchor: `F`, the partner's blinded set with dummies and padding.
    BlindedSet,
    /// Round 1, anchor → partner: `P = a·G` and `L`, the anchor's blinded set by group.
    AnchorSet,
    /// Round 2, partner → anchor: `R`, the doubly blinded `L` plus dummy slots, by group.
    Reply,
}

impl MessageKind {
    fn code(self) -> u8 {
        match self {
            MessageKind::BlindedSet => 1,
            MessageKind::AnchorSet => 2,
            MessageKind::Reply => 3,
        }
    }

    fn from_code(code: u8) -> Option<MessageKind> {
        match code {
            1 => Some(MessageKind::BlindedSet),
            2 => Some(MessageKind::AnchorSet),
            3 => Some(MessageKind::Reply),
            _ => None,
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MessageKind::BlindedSet => "F (blinded set)",
            MessageKind::AnchorSet => "L (anchor set)",
            MessageKind::Reply => "R (reply)",
        })
    }
}

/// Round 1, partner → anchor: `F = shuffle({b·H(y)} ∪ {b·r_j·G} ∪ J_B random points)`.
#[derive(Clone, PartialEq, Eq)]
pub struct RoundF {
    pub(crate) points: Vec<RistrettoPoint>,
}

/// Round 1, anchor → partner: `P = a·G`, and per group `g` the shuffled
/// `{a·H(x) : g(x) = g} ∪ J_g random points`.
#[derive(Clone, PartialEq, Eq)]
pub struct RoundL {
    pub(crate) key_share: RistrettoPoint,
    pub(crate) groups: Vec<Vec<RistrettoPoint>>,
}

/// Round 2, partner → anchor: per group, `b·Q` for every `Q` of `L`'s group plus `2μ`
/// dummy slots, shuffled within the group.
#[derive(Clone, PartialEq, Eq)]
pub struct RoundR {
    pub(crate) groups: Vec<Vec<CompressedRistretto>>,
}

// Points are pseudonymised personal data: `Debug` shows sizes only.
impl fmt::Debug for RoundF {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoundF({} points)", self.points.len())
    }
}

impl fmt::Debug for RoundL {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoundL(group sizes {:?})", self.group_sizes())
    }
}

impl fmt::Debug for RoundR {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoundR(group sizes {:?})", self.group_sizes())
    }
}

impl RoundF {
    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The chunks to send, one per frame (always at least one).
    pub fn to_chunks(&self) -> Vec<Vec<u8>> {
        self.chunks_of(MAX_CHUNK_ELEMENTS)
    }

    pub(crate) fn chunks_of(&self, per_chunk: usize) -> Vec<Vec<u8>> {
        let compressed = compress_all(&self.points);
        encode(MessageKind::BlindedSet, 1, None, &[compressed], per_chunk)
    }

    /// Decode a whole message from its chunks, accepting at most `max_elements` points.
    pub fn from_chunks<'a>(
        chunks: impl IntoIterator<Item = &'a [u8]>,
        max_elements: usize,
    ) -> Result<RoundF, DecodeError> {
        let mut a = Assembler::new(MessageKind::BlindedSet, 1, max_elements);
        for c in chunks {
            a.push(c)?;
        }
        a.finish_f()
    }
}

impl RoundL {
    pub fn group_sizes(&self) -> Vec<usize> {
        self.groups.iter().map(Vec::len).collect()
    }

    pub fn to_chunks(&self) -> Vec<Vec<u8>> {
        self.chunks_of(MAX_CHUNK_ELEMENTS)
    }

    pub(crate) fn chunks_of(&self, per_chunk: usize) -> Vec<Vec<u8>> {
        let groups: Vec<Vec<[u8; 32]>> = self.groups.iter().map(|g| compress_all(g)).collect();
        encode(
            MessageKind::AnchorSet,
            group_count(groups.len()),
            Some(self.key_share.compress().to_bytes()),
            &groups,
            per_chunk,
        )
    }

    pub fn from_chunks<'a>(
        chunks: impl IntoIterator<Item = &'a [u8]>,
        groups: usize,
        max_elements: usize,
    ) -> Result<RoundL, DecodeError> {
        let mut a = Assembler::new(MessageKind::AnchorSet, group_count(groups), max_elements);
        for c in chunks {
            a.push(c)?;
        }
        a.finish_l()
    }
}

impl RoundR {
    pub fn group_sizes(&self) -> Vec<usize> {
        self.groups.iter().map(Vec::len).collect()
    }

    pub fn to_chunks(&self) -> Vec<Vec<u8>> {
        self.chunks_of(MAX_CHUNK_ELEMENTS)
    }

    pub(crate) fn chunks_of(&self, per_chunk: usize) -> Vec<Vec<u8>> {
        let groups: Vec<Vec<[u8; 32]>> = self
            .groups
            .iter()
            .map(|g| g.iter().map(|c| c.to_bytes()).collect())
            .collect();
        encode(
            MessageKind::Reply,
            group_count(groups.len()),
            None,
            &groups,
            per_chunk,
        )
    }

    pub fn from_chunks<'a>(
        chunks: impl IntoIterator<Item = &'a [u8]>,
        groups: usize,
        max_elements: usize,
    ) -> Result<RoundR, DecodeError> {
        let mut a = Assembler::new(MessageKind::Reply, group_count(groups), max_elements);
        for c in chunks {
            a.push(c)?;
        }
        a.finish_r()
    }
}

/// Group counts are bounded by the query (a handful of cells), far below `u32::MAX`;
/// saturating keeps the conversion total without a panic path.
fn group_count(groups: usize) -> u32 {
    u32::try_from(groups).unwrap_or(u32::MAX)
}

/// Compress every point, on every core (a million points take ~3.5 s on one).
fn compress_all(points: &[RistrettoPoint]) -> Vec<[u8; 32]> {
    crate::protocol::par_map(points, |p| p.compress().to_bytes())
}

fn put_u32(out: &mut Vec<u8>, v: usize) {
    // Every count written is bounded by MAX_CHUNK_ELEMENTS or the group count.
    out.extend_from_slice(&u32::try_from(v).unwrap_or(u32::MAX).to_be_bytes());
}

/// One run of a group's points inside a chunk.
type Segment<'a> = (usize, &'a [[u8; 32]]);

/// Split per-group element lists into chunks of at most `per_chunk` points (at most
/// [`MAX_CHUNK_ELEMENTS`]), filling each chunk before starting the next.
fn encode(
    kind: MessageKind,
    groups: u32,
    key: Option<[u8; 32]>,
    by_group: &[Vec<[u8; 32]>],
    per_chunk: usize,
) -> Vec<Vec<u8>> {
    let per_chunk = per_chunk.clamp(1, MAX_CHUNK_ELEMENTS);
    // Plan: a list of chunks, each a list of (group, slice).
    let mut plan: Vec<Vec<Segment<'_>>> = vec![Vec::new()];
    let mut room = per_chunk;
    for (g, elems) in by_group.iter().enumerate() {
        let mut rest: &[[u8; 32]] = elems;
        while !rest.is_empty() {
            if room == 0 {
                plan.push(Vec::new());
                room = per_chunk;
            }
            let take = rest.len().min(room);
            let (head, tail) = rest.split_at(take);
            if let Some(chunk) = plan.last_mut() {
                chunk.push((g, head));
            }
            room -= take;
            rest = tail;
        }
    }
    plan.iter()
        .enumerate()
        .map(|(index, segments)| {
            let n: usize = segments.iter().map(|(_, s)| s.len()).sum();
            let mut out = Vec::with_capacity(16 + 33 + segments.len() * 8 + n * POINT_LEN);
            out.push(VERSION);
            out.push(kind.code());
            out.extend_from_slice(&groups.to_be_bytes());
            put_u32(&mut out, index);
            if kind == MessageKind::AnchorSet {
                match (index, key) {
                    (0, Some(k)) => {
                        out.push(1);
                        out.extend_from_slice(&k);
                    }
                    _ => out.push(0),
                }
            }
            put_u32(&mut out, segments.len());
            for (g, s) in segments {
                put_u32(&mut out, *g);
                put_u32(&mut out, s.len());
                for p in *s {
                    out.extend_from_slice(p);
                }
            }
            out
        })
        .collect()
}

/// A cursor over one chunk that reports where it ran out.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeError::Truncated { at: self.at })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }
}

/// Reassembles one message from its chunks, validating each as it arrives so that a bad
/// chunk is refused before the next is read.
pub(crate) struct Assembler {
    kind: MessageKind,
    groups: u32,
    max_elements: usize,
    next_chunk: u32,
    last_group: Option<u32>,
    seen: HashSet<[u8; 32]>,
    elements: usize,
    key: Option<RistrettoPoint>,
    /// F and L: kept decompressed, for the receiver's multiplication.
    points: Vec<Vec<RistrettoPoint>>,
    /// R: kept compressed, for matching.
    compressed: Vec<Vec<CompressedRistretto>>,
}

impl fmt::Debug for Assembler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Assembler")
            .field("kind", &self.kind)
            .field("chunks", &self.next_chunk)
            .field("elements", &self.elements)
            .finish_non_exhaustive()
    }
}

impl Assembler {
    /// Expect a message of `kind` over `groups` groups, of at most `max_elements` points.
    pub(crate) fn new(kind: MessageKind, groups: u32, max_elements: usize) -> Assembler {
        let n = usize::try_from(groups).unwrap_or(0);
        Assembler {
            kind,
            groups,
            max_elements,
            next_chunk: 0,
            last_group: None,
            seen: HashSet::new(),
            elements: 0,
            key: None,
            points: vec![Vec::new(); if kind == MessageKind::Reply { 0 } else { n }],
            compressed: vec![Vec::new(); if kind == MessageKind::Reply { n } else { 0 }],
        }
    }

    pub(crate) fn kind(&self) -> MessageKind {
        self.kind
    }

    /// Validate and take in the next chunk.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<(), DecodeError> {
        let mut r = Reader { buf: chunk, at: 0 };
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let code = r.u8()?;
        let kind = MessageKind::from_code(code).ok_or(DecodeError::UnknownKind(code))?;
        if kind != self.kind {
            return Err(DecodeError::WrongKind {
                expected: self.kind,
                got: kind,
            });
        }
        let groups = r.u32()?;
        if groups != self.groups {
            return Err(DecodeError::WrongGroupCount {
                expected: self.groups,
                got: groups,
            });
        }
        let index = r.u32()?;
        if index != self.next_chunk {
            return Err(DecodeError::ChunkOrder {
                expected: self.next_chunk,
                got: index,
            });
        }
        if self.kind == MessageKind::AnchorSet {
            match (r.u8()?, index) {
                (1, 0) => {
                    let p = self.decode_point(r.take(POINT_LEN)?)?;
                    self.key = Some(p);
                }
                (0, 0) => return Err(DecodeError::MissingKeyShare),
                (0, _) => {}
                _ => return Err(DecodeError::UnexpectedKeyShare),
            }
        }
        let segments = r.u32()?;
        let mut in_chunk = 0usize;
        for s in 0..segments {
            let group = r.u32()?;
            let count = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
            if group >= self.groups {
                return Err(DecodeError::GroupOutOfRange {
                    group,
                    groups: self.groups,
                });
            }
            if let Some(previous) = self.last_group {
                // Strictly increasing inside a chunk; the first segment of a chunk may
                // continue the previous chunk's last group.
                if group < previous || (group == previous && s > 0) {
                    return Err(DecodeError::GroupOrder { previous, group });
                }
            }
            if count == 0 {
                return Err(DecodeError::EmptySegment { group });
            }
            in_chunk = in_chunk.saturating_add(count);
            if in_chunk > MAX_CHUNK_ELEMENTS {
                return Err(DecodeError::ChunkTooLarge {
                    got: in_chunk,
                    max: MAX_CHUNK_ELEMENTS,
                });
            }
            if self.elements.saturating_add(count) > self.max_elements {
                return Err(DecodeError::TooManyElements {
                    max: self.max_elements,
                });
            }
            // Check the length before decoding anything, so a lying count costs nothing.
            if r.remaining() < count.saturating_mul(POINT_LEN) {
                return Err(DecodeError::Truncated { at: chunk.len() });
            }
            let g = usize::try_from(group).unwrap_or(usize::MAX);
            // Decompress the segment's points on every core first (the costly part),
            // then check them in order, so the first bad point is the one reported.
            let encoded: Vec<[u8; 32]> = r
                .take(count.saturating_mul(POINT_LEN))?
                .chunks_exact(POINT_LEN)
                .map(|b| {
                    let mut a = [0u8; POINT_LEN];
                    a.copy_from_slice(b);
                    a
                })
                .collect();
            let decoded =
                crate::protocol::par_map(&encoded, |a| CompressedRistretto(*a).decompress());
            for (arr, p) in encoded.into_iter().zip(decoded) {
                let p = self.check_point(arr, p)?;
                if self.kind == MessageKind::Reply {
                    if let Some(v) = self.compressed.get_mut(g) {
                        v.push(CompressedRistretto(arr));
                    }
                } else if let Some(v) = self.points.get_mut(g) {
                    v.push(p);
                }
            }
            self.last_group = Some(group);
        }
        if r.remaining() != 0 {
            return Err(DecodeError::TrailingBytes {
                extra: r.remaining(),
            });
        }
        self.next_chunk = self
            .next_chunk
            .checked_add(1)
            .ok_or(DecodeError::AfterEnd)?;
        Ok(())
    }

    /// Check one point (canonical, not the identity, not seen before) and count it.
    fn decode_point(&mut self, bytes: &[u8]) -> Result<RistrettoPoint, DecodeError> {
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| DecodeError::Truncated { at: self.elements })?;
        let p = CompressedRistretto(arr).decompress();
        self.check_point(arr, p)
    }

    /// [`Assembler::decode_point`] for a point already decompressed (`None`: `arr` is
    /// not a canonical encoding).
    fn check_point(
        &mut self,
        arr: [u8; 32],
        p: Option<RistrettoPoint>,
    ) -> Result<RistrettoPoint, DecodeError> {
        let index = self.elements;
        let p = p.ok_or(DecodeError::NonCanonicalPoint { index })?;
        if p.is_identity() {
            return Err(DecodeError::IdentityPoint { index });
        }
        if !self.seen.insert(arr) {
            return Err(DecodeError::Duplicate { index });
        }
        self.elements += 1;
        Ok(p)
    }

    fn started(&self) -> Result<(), DecodeError> {
        if self.next_chunk == 0 {
            Err(DecodeError::Empty)
        } else {
            Ok(())
        }
    }

    pub(crate) fn finish_f(mut self) -> Result<RoundF, DecodeError> {
        self.started()?;
        Ok(RoundF {
            points: self.points.pop().unwrap_or_default(),
        })
    }

    pub(crate) fn finish_l(self) -> Result<RoundL, DecodeError> {
        self.started()?;
        Ok(RoundL {
            key_share: self.key.ok_or(DecodeError::MissingKeyShare)?,
            groups: self.points,
        })
    }

    pub(crate) fn finish_r(self) -> Result<RoundR, DecodeError> {
        self.started()?;
        Ok(RoundR {
            groups: self.compressed,
        })
    }
}
