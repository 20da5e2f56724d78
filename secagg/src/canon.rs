//! Canonical, length-prefixed byte strings for everything this crate signs, derives keys
//! from or encrypts as associated data.
//!
//! Every field carries its length, so two different field lists can never produce the same
//! bytes; each string starts with a domain label, so bytes made for one purpose are never
//! valid for another. (phm-relay has the same helper but keeps it crate-private.)

/// A canonical byte string under construction.
pub(crate) struct Canon(Vec<u8>);

impl Canon {
    pub(crate) fn new(label: &str) -> Canon {
        let mut c = Canon(Vec::with_capacity(128));
        c.bytes(label.as_bytes());
        c
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Canon {
        self.0.extend_from_slice(&(b.len() as u64).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Canon {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::Canon;

    #[test]
    fn field_boundaries_are_kept() {
        let mut a = Canon::new("x");
        a.bytes(b"ab").bytes(b"c");
        let mut b = Canon::new("x");
        b.bytes(b"a").bytes(b"bc");
        assert_ne!(a.finish(), b.finish());
    }
}
