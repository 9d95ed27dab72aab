//! Reading a structured input out of the fuzzer's bytes. Every read succeeds: past the end
//! it yields zeros and empty slices, so every byte string is a valid input and the fuzzer
//! never wastes runs on inputs a target would skip.

pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn byte(&mut self) -> u8 {
        let (&first, rest) = self.data.split_first().unwrap_or((&0, &[]));
        self.data = rest;
        first
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    pub fn u64(&mut self) -> u64 {
        let mut out = [0u8; 8];
        out.iter_mut().for_each(|b| *b = self.byte());
        u64::from_le_bytes(out)
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A field: a 16-bit little-endian length, then that many bytes (or what is left).
    pub fn field(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.bytes(n)
    }

    pub fn rest(self) -> &'a [u8] {
        self.data
    }
}
