//! Scanning a byte stream in pieces, the way the session relay reads a backend: whatever
//! arrived is appended to what the scanner left unconsumed, and scanning resumes there.
//! Targets use it to show that the result does not depend on where reads happen to end.

use ferrata_proxy::protocol::frame::{Flow, PacketStart, Scanner};

/// Read sizes from 1 to 64 bytes drawn from `seed` (0: the whole stream in one read).
pub fn read_sizes(seed: u8) -> impl Iterator<Item = usize> {
    let mut state = u32::from(seed);
    std::iter::repeat_with(move || {
        if seed == 0 {
            return usize::MAX;
        }
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        1 + (state >> 16) as usize % 64
    })
}

/// Feeds `stream` to `scanner` in reads of the sizes `reads` yields, as
/// [`Scanner::scan`] would see them in the relay. Returns the bytes consumed and whether the
/// callback's stop was reached; stops at the end of the stream otherwise.
pub fn scan_in_reads<E>(
    scanner: &mut Scanner,
    stream: &[u8],
    reads: &mut impl Iterator<Item = usize>,
    peek: usize,
    mut on_packet: impl FnMut(PacketStart<'_>) -> Result<Flow, E>,
) -> Result<(usize, bool), E> {
    let mut buf = Vec::new();
    let mut fed = 0;
    let mut consumed = 0;
    loop {
        let (used, stopped) = scanner.scan(&buf, peek, &mut on_packet)?;
        consumed += used;
        buf.drain(..used);
        if stopped || fed == stream.len() {
            return Ok((consumed, stopped));
        }
        let n = reads.next().unwrap_or(usize::MAX).min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
    }
}
