//! Helpers shared by the engine's integration tests (each `tests/*.rs` is its own crate).

/// Recurses `n` frames of ~1 KiB each and returns `n`: `8 * 1024` needs 8 MiB of stack, more
/// than rayon's default 2 MiB, as candle's backward walks the graph recursively on the thread.
pub fn deep_recursion(n: usize) -> usize {
    let pad = std::hint::black_box([0u8; 1024]);
    if n == 0 {
        pad[0] as usize
    } else {
        1 + deep_recursion(n - 1) + pad[1] as usize
    }
}
