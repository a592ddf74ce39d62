//! A global allocator that keeps freed large blocks for the next allocation of their size.
//!
//! glibc serves every allocation of 32 MiB or more (the most `M_MMAP_THRESHOLD` takes on 64-bit,
//! [`crate::device::tune_allocator`]) with a fresh `mmap` and unmaps it on free. A training step
//! allocates the same large activations and gradients every time (tiny_w8 at 256 px, batch 8:
//! the stage-1 MLP hidden is 50 MB), so each step the kernel faults their pages in one by one and
//! zeroes them: ~72 k page faults per step there, and a 32768 x 96 -> 384 linear ran at 30
//! GFLOP/s into a fresh output against ~95 at 8192 rows. [`CachingAlloc`] keeps those blocks
//! (size classes of [`GRAIN`], at most [`CAP`] bytes, oldest evicted first) and hands them out
//! again; everything smaller goes straight to the system allocator. Like PyTorch's CUDA caching
//! allocator, minus the splitting: steps repeat their sizes exactly.
//!
//! The binary installs it (`#[global_allocator]` in `src/main.rs`); the library and its tests use
//! the system allocator. [`release`] returns the cached blocks (the benchmark does between rows,
//! so that one row's cache never counts in the next row's peak memory).
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Blocks of at least this many bytes are cached: glibc's mmap threshold as `tune_allocator`
/// sets it (below it, glibc's heap already reuses freed memory).
pub const LARGE: usize = 32 << 20;
/// Cached blocks are allocated in multiples of this (at most 1/16 more than asked at [`LARGE`]).
pub const GRAIN: usize = 2 << 20;
/// The most bytes kept cached, idle; a freed block beyond it evicts the oldest ones.
pub const CAP: usize = 1 << 30;
/// The most blocks kept cached.
const SLOTS: usize = 64;
/// The alignment of every cached block (what `malloc` gives on 64-bit).
const ALIGN: usize = 16;

/// Idle blocks, oldest first: `(class bytes, address)`. A fixed array: the allocator must not
/// allocate.
pub struct BlockCache {
    idle: Mutex<Idle>,
}

struct Idle {
    blocks: [(usize, usize); SLOTS],
    len: usize,
    bytes: usize,
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockCache {
    pub const fn new() -> Self {
        Self {
            idle: Mutex::new(Idle {
                blocks: [(0, 0); SLOTS],
                len: 0,
                bytes: 0,
            }),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        // nothing panics while the lock is held; a poisoned lock still holds consistent data
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held idle now.
    #[cfg(test)]
    fn idle_bytes(&self) -> usize {
        self.idle().bytes
    }

    /// Gives every idle block back to the system.
    pub fn release(&self) {
        let mut idle = self.idle();
        for &(class, addr) in &idle.blocks[..idle.len] {
            // SAFETY: the block came from `System.alloc` with this layout and is unused.
            unsafe { System.dealloc(addr as *mut u8, block_layout(class)) };
        }
        idle.len = 0;
        idle.bytes = 0;
    }

    /// An idle block of `class` bytes, removed from the cache, or None.
    fn take(&self, class: usize) -> Option<*mut u8> {
        let mut idle = self.idle();
        let len = idle.len;
        // the newest block of the class: the most likely still in the CPU caches
        let i = (0..len).rev().find(|&i| idle.blocks[i].0 == class)?;
        let (_, addr) = idle.blocks[i];
        idle.blocks.copy_within(i + 1..len, i);
        idle.len -= 1;
        idle.bytes -= class;
        Some(addr as *mut u8)
    }

    /// Keeps a freed block, evicting the oldest ones past [`CAP`] or [`SLOTS`].
    fn put(&self, class: usize, ptr: *mut u8) {
        if class > CAP {
            // SAFETY: from `System.alloc` with this layout, no longer used.
            unsafe { System.dealloc(ptr, block_layout(class)) };
            return;
        }
        let mut idle = self.idle();
        let mut evict = 0;
        let mut freed = 0;
        while idle.len - evict == SLOTS || idle.bytes - freed + class > CAP {
            let (c, addr) = idle.blocks[evict];
            // SAFETY: as above, for an idle block.
            unsafe { System.dealloc(addr as *mut u8, block_layout(c)) };
            freed += c;
            evict += 1;
        }
        let len = idle.len;
        idle.blocks.copy_within(evict..len, 0);
        idle.len -= evict;
        idle.bytes -= freed;
        let len = idle.len;
        idle.blocks[len] = (class, ptr as usize);
        idle.len += 1;
        idle.bytes += class;
    }
}

/// Whether a layout is served by the cache.
fn cached(layout: Layout) -> bool {
    layout.size() >= LARGE && layout.align() <= ALIGN
}

/// The size class of a cached layout.
fn class_of(layout: Layout) -> usize {
    layout.size().next_multiple_of(GRAIN)
}

fn block_layout(class: usize) -> Layout {
    // SAFETY: ALIGN is a power of two and a class is far below isize::MAX.
    unsafe { Layout::from_size_align_unchecked(class, ALIGN) }
}

// SAFETY: every block handed out is either the system's for this layout or an idle cached block
// of the layout's class (at least its size, aligned to ALIGN >= its alignment), owned by one
// caller at a time (the mutex).
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !cached(layout) {
            return System.alloc(layout);
        }
        let class = class_of(layout);
        self.take(class)
            .unwrap_or_else(|| System.alloc(block_layout(class)))
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !cached(layout) {
            return System.alloc_zeroed(layout);
        }
        let class = class_of(layout);
        match self.take(class) {
            Some(p) => {
                p.write_bytes(0, layout.size());
                p
            }
            // fresh pages from the kernel are zero already
            None => System.alloc_zeroed(block_layout(class)),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if cached(layout) {
            self.put(class_of(layout), ptr)
        } else {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align_unchecked(new_size, layout.align());
        if !cached(layout) && !cached(new) {
            return System.realloc(ptr, layout, new_size);
        }
        if cached(layout) && cached(new) && class_of(layout) == class_of(new) {
            return ptr;
        }
        let out = self.alloc(new);
        if !out.is_null() {
            std::ptr::copy_nonoverlapping(ptr, out, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        out
    }
}

/// The process-wide cache behind [`CachingAlloc`].
static CACHE: BlockCache = BlockCache::new();

/// The global allocator handle: `#[global_allocator] static A: CachingAlloc = CachingAlloc;`.
pub struct CachingAlloc;

// SAFETY: forwards to the process-wide BlockCache.
unsafe impl GlobalAlloc for CachingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        CACHE.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        CACHE.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CACHE.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        CACHE.realloc(ptr, layout, new_size)
    }
}

/// Gives the process-wide cache's idle blocks back to the system (a no-op where [`CachingAlloc`]
/// is not the global allocator: the cache is then always empty).
pub fn release() {
    CACHE.release()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(bytes: usize) -> Layout {
        Layout::from_size_align(bytes, 4).unwrap()
    }

    #[test]
    fn a_freed_large_block_is_reused_for_its_class_and_zeroed_on_request() {
        let c = BlockCache::new();
        unsafe {
            let a = c.alloc(layout(LARGE + 10));
            assert!(!a.is_null());
            a.write_bytes(7, LARGE + 10);
            c.dealloc(a, layout(LARGE + 10));
            assert_eq!(c.idle_bytes(), LARGE + GRAIN);
            // another size of the same 2 MiB class gets the same block, zeroed
            let b = c.alloc_zeroed(layout(LARGE + 1000));
            assert_eq!(b, a);
            assert_eq!(c.idle_bytes(), 0);
            let s = std::slice::from_raw_parts(b, LARGE + 1000);
            assert!(s.iter().all(|&x| x == 0));
            // a different class does not
            c.dealloc(b, layout(LARGE + 1000));
            let d = c.alloc(layout(LARGE + GRAIN + 1));
            assert_ne!(d, b);
            c.dealloc(d, layout(LARGE + GRAIN + 1));
            assert_eq!(c.idle_bytes(), 2 * LARGE + 3 * GRAIN);
            c.release();
            assert_eq!(c.idle_bytes(), 0);
        }
    }

    #[test]
    fn small_blocks_bypass_the_cache_and_the_cap_evicts_the_oldest() {
        let c = BlockCache::new();
        unsafe {
            let s = c.alloc(layout(4096));
            c.dealloc(s, layout(4096));
            assert_eq!(c.idle_bytes(), 0);
            // CAP / LARGE blocks fill the cache; one more evicts the first
            let n = CAP / LARGE;
            let blocks: Vec<_> = (0..=n).map(|_| c.alloc(layout(LARGE))).collect();
            for &b in &blocks {
                c.dealloc(b, layout(LARGE));
            }
            assert_eq!(c.idle_bytes(), n * LARGE);
            // the newest is handed out first; the oldest was given back
            assert_eq!(c.alloc(layout(LARGE)), blocks[n]);
            let idle = c.idle();
            assert!(idle.blocks[..idle.len]
                .iter()
                .all(|&(_, a)| a != blocks[0] as usize));
            drop(idle);
            c.dealloc(blocks[n], layout(LARGE));
            c.release();
        }
    }

    #[test]
    fn realloc_keeps_the_contents_across_the_threshold() {
        let c = BlockCache::new();
        unsafe {
            let p = c.alloc(layout(1024));
            for i in 0..1024 {
                *p.add(i) = i as u8;
            }
            let q = c.realloc(p, layout(1024), LARGE);
            assert!((0..1024).all(|i| *q.add(i) == i as u8));
            let r = c.realloc(q, layout(LARGE), 2048);
            assert!((0..1024).all(|i| *r.add(i) == i as u8));
            // the large block went to the cache
            assert_eq!(c.idle_bytes(), LARGE);
            c.dealloc(r, layout(2048));
            c.release();
        }
    }
}
