//! Swin's (shifted) window partition and its inverse, each one copy.
//!
//! Composed, a block's windows are `roll` (candle: `narrow` + `cat` per dim) -> reshape ->
//! permute -> contiguous copy -> reshape, and back the same way: five nodes each way, and
//! candle's backward starts every node's input gradient at zero and adds into it. Here each
//! direction is one gather of `C`-element rows, and its backward is the other direction.
//!
//! A map that the windows do not divide is padded with zero rows at the bottom and right after
//! the shift, and cropped after the merge (timm `SwinTransformerV2Block._attn` with
//! `strict_img_size=False`): [`partition_windows_padded`], [`merge_windows_cropped`].
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::is_fused;

/// `[B, H, W, C]` -> `[B*nW, ws, ws, C]`, window index = b*nW + row*(W/ws) + col (the composed
/// reference; [`partition_windows`] is the one node with the shift folded in).
pub fn window_partition(x: &Tensor, ws: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.reshape((b, h / ws, ws, w / ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b * (h / ws) * (w / ws), ws, ws, c))
}

/// Inverse of [`window_partition`]: `[B*nW, ws, ws, C]` -> `[B, H, W, C]`.
pub fn window_reverse(w: &Tensor, ws: usize, h: usize, w_: usize) -> Result<Tensor> {
    let (bn, _, _, c) = w.dims4()?;
    let b = bn / ((h / ws) * (w_ / ws));
    w.reshape((b, h / ws, w_ / ws, ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b, h, w_, c))
}

/// The windows of `x [B, H, W, C]` cyclically shifted by `-shift` (`torch.roll(x, (-s, -s),
/// (1, 2))`, then [`window_partition`]), as `[B*nW, ws*ws, C]` token rows. Differentiable.
/// `ws` must divide `H` and `W` (see [`partition_windows_padded`] for any size).
pub fn partition_windows(x: &Tensor, ws: usize, shift: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    partition(x, Grid::new(b, h, w, c, ws, shift)?)
}

/// [`partition_windows`] of a map of any size: after the shift, the map is padded with zeros at
/// the bottom and right to `(ceil(H/ws)*ws, ceil(W/ws)*ws)` (timm's `F.pad` in
/// `SwinTransformerV2Block._attn`), so nW counts the windows of the padded map. The same op,
/// copy for copy, as [`partition_windows`] when `ws` divides `H` and `W`. Differentiable (the
/// padding gets no gradient).
pub fn partition_windows_padded(x: &Tensor, ws: usize, shift: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    partition(x, Grid::padded(b, h, w, c, ws, shift)?)
}

fn partition(x: &Tensor, g: Grid) -> Result<Tensor> {
    if !is_fused(x) {
        let (s, ws) = (g.shift as i32, g.ws);
        let x = if g.shift > 0 {
            x.roll(-s, 1)?.roll(-s, 2)?
        } else {
            x.clone()
        };
        let x = x
            .pad_with_zeros(1, 0, g.hp - g.h)?
            .pad_with_zeros(2, 0, g.wp - g.w)?;
        return window_partition(&x, ws)?.reshape((g.windows(), ws * ws, g.c));
    }
    x.contiguous()?.apply_op1(Windows { g, merge: false })
}

/// Inverse of [`partition_windows`]: `[B*nW, ws*ws, C]` token rows -> `[B, H, W, C]`, shifted
/// back by `+shift`. Differentiable.
pub fn merge_windows(
    win: &Tensor,
    ws: usize,
    shift: usize,
    (h, w): (usize, usize),
) -> Result<Tensor> {
    merge(win, ws, shift, (h, w), false)
}

/// Inverse of [`partition_windows_padded`]: the windows of the padded map -> `[B, H, W, C]`, the
/// padding cropped before the shift back (timm: `window_reverse` to the padded size,
/// `[:, :H, :W]`, `roll(+shift)`). Differentiable.
pub fn merge_windows_cropped(
    win: &Tensor,
    ws: usize,
    shift: usize,
    (h, w): (usize, usize),
) -> Result<Tensor> {
    merge(win, ws, shift, (h, w), true)
}

fn merge(
    win: &Tensor,
    ws: usize,
    shift: usize,
    (h, w): (usize, usize),
    pad: bool,
) -> Result<Tensor> {
    let (bn, n, c) = win.dims3()?;
    let up = |v: usize| {
        if pad {
            v.div_ceil(ws.max(1))
        } else {
            v / ws.max(1)
        }
    };
    let per_image = up(h) * up(w);
    if n != ws * ws || per_image == 0 || bn % per_image != 0 {
        candle_core::bail!(
            "merge-windows: {:?} is not [B*nW, {ws}*{ws}, C] windows of a {h}x{w} map",
            win.dims()
        )
    }
    let b = bn / per_image;
    let g = if pad {
        Grid::padded(b, h, w, c, ws, shift)?
    } else {
        Grid::new(b, h, w, c, ws, shift)?
    };
    if !is_fused(win) {
        let s = shift as i32;
        let x = window_reverse(&win.reshape((bn, ws, ws, c))?, ws, g.hp, g.wp)?;
        let x = if (g.hp, g.wp) == (h, w) {
            x
        } else {
            x.narrow(1, 0, h)?.narrow(2, 0, w)?
        };
        return if shift > 0 {
            x.roll(s, 1)?.roll(s, 2)
        } else {
            Ok(x)
        };
    }
    win.contiguous()?.apply_op1(Windows { g, merge: true })
}

/// A `[B, H, W, C]` map cut into `ws x ws` windows after a cyclic shift by `-shift`, the shifted
/// map padded with zeros to `hp x wp` (multiples of `ws`; `hp = H`, `wp = W` when `ws` divides).
#[derive(Clone, Copy)]
struct Grid {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    ws: usize,
    shift: usize,
    hp: usize,
    wp: usize,
}

impl Grid {
    /// `ws` must divide `h` and `w`: no padding.
    fn new(b: usize, h: usize, w: usize, c: usize, ws: usize, shift: usize) -> Result<Self> {
        if ws == 0 || !h.is_multiple_of(ws) || !w.is_multiple_of(ws) || shift >= ws.max(1) {
            candle_core::bail!(
                "windows: a {h}x{w} map does not split into {ws}x{ws} windows shifted by {shift}"
            )
        }
        Ok(Self {
            b,
            h,
            w,
            c,
            ws,
            shift,
            hp: h,
            wp: w,
        })
    }

    /// Any non-empty map: padded up to multiples of `ws`.
    fn padded(b: usize, h: usize, w: usize, c: usize, ws: usize, shift: usize) -> Result<Self> {
        if ws == 0 || h == 0 || w == 0 || shift >= ws.max(1) {
            candle_core::bail!(
                "windows: a {h}x{w} map cannot be cut into {ws}x{ws} windows shifted by {shift}"
            )
        }
        Ok(Self {
            b,
            h,
            w,
            c,
            ws,
            shift,
            hp: h.div_ceil(ws) * ws,
            wp: w.div_ceil(ws) * ws,
        })
    }

    fn windows(&self) -> usize {
        self.b * (self.hp / self.ws) * (self.wp / self.ws)
    }

    /// The map pixel `(b, i, j)` (flat, in rows of C) that window row `r` (flat) reads; `None`
    /// for a row of the padding.
    fn pixel(&self, r: usize) -> Option<usize> {
        let (ws, n) = (self.ws, self.ws * self.ws);
        let (per_row, per_image) = (self.wp / ws, (self.hp / ws) * (self.wp / ws));
        let (win, t) = (r / n, r % n);
        let (b, wi) = (win / per_image, win % per_image);
        // position in the shifted, padded map
        let (i, j) = ((wi / per_row) * ws + t / ws, (wi % per_row) * ws + t % ws);
        if i >= self.h || j >= self.w {
            return None;
        }
        let i = (i + self.shift) % self.h;
        let j = (j + self.shift) % self.w;
        Some((b * self.h + i) * self.w + j)
    }

    /// The window row (flat) that map pixel `p` (flat) lands in: the inverse of [`Self::pixel`].
    fn window_row(&self, p: usize) -> usize {
        let (ws, n) = (self.ws, self.ws * self.ws);
        let (per_row, per_image) = (self.wp / ws, (self.hp / ws) * (self.wp / ws));
        let (b, i, j) = (p / (self.h * self.w), p / self.w % self.h, p % self.w);
        // a map smaller than the shift rolls by the shift modulo its size (torch.roll)
        let (i, j) = (
            (i + self.h - self.shift % self.h) % self.h,
            (j + self.w - self.shift % self.w) % self.w,
        );
        let win = b * per_image + (i / ws) * per_row + j / ws;
        win * n + (i % ws) * ws + j % ws
    }

    /// Rows of C elements of the map (`merge: true`) or of the windows (`false`).
    fn rows(&self, merge: bool) -> usize {
        if merge {
            self.b * self.h * self.w
        } else {
            self.windows() * self.ws * self.ws
        }
    }
}

/// `merge: false`: map -> window rows (zero rows for the padding); `true`: window rows -> map
/// (the padding's rows dropped). Without padding, both are permutations of `C`-element rows.
struct Windows {
    g: Grid,
    merge: bool,
}

impl Windows {
    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let c = self.g.c;
        let mut out = vec![T::zero(); self.g.rows(self.merge) * c];
        // rows per task: whole rows, about 16K elements
        let rows = (16 * 1024 / c.max(1)).max(1);
        out.par_chunks_mut(rows * c)
            .enumerate()
            .for_each(|(t, dst)| {
                for (k, row) in dst.chunks_exact_mut(c).enumerate() {
                    let r = t * rows + k;
                    let src = if self.merge {
                        Some(self.g.window_row(r))
                    } else {
                        self.g.pixel(r)
                    };
                    if let Some(src) = src {
                        row.copy_from_slice(&x[src * c..][..c]);
                    }
                }
            });
        out
    }
}

impl CustomOp1 for Windows {
    fn name(&self) -> &'static str {
        "windows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((a, z)) = l.contiguous_offsets() else {
            candle_core::bail!("windows: non-contiguous input")
        };
        let g = self.g;
        if z - a != g.rows(!self.merge) * g.c {
            candle_core::bail!("windows: {:?} does not match the grid", l.shape())
        }
        let shape = if self.merge {
            Shape::from((g.b, g.h, g.w, g.c))
        } else {
            Shape::from((g.windows(), g.ws * g.ws, g.c))
        };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[a..z])),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[a..z])),
            _ => candle_core::bail!("windows: f32 or f64 expected"),
        };
        Ok((out, shape))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = Windows {
            g: self.g,
            merge: !self.merge,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Equal, bit for bit, to the composed roll + partition (and reverse + roll back), forward
    /// and backward, with and without a shift, on a non-square map of several images.
    #[test]
    fn match_composed_roll_and_partition() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, w, c, ws) = (2, 8, 12, 3, 4);
        for dt in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, h, w, c), &dev)?.to_dtype(dt)?)?;
            let n = b * (h / ws) * (w / ws);
            let probe = Tensor::randn(0f64, 1.0, (n, ws * ws, c), &dev)?.to_dtype(dt)?;
            for shift in [0, 1, 3] {
                let s = shift as i32;
                let rolled = x.roll(-s, 1)?.roll(-s, 2)?;
                let plain = window_partition(&rolled, ws)?.reshape((n, ws * ws, c))?;
                let fused = partition_windows(&x, ws, shift)?;
                assert!(same(&fused, &plain)?, "{dt:?} partition, shift {shift}");
                let back = merge_windows(&fused, ws, shift, (h, w))?;
                assert!(same(&back, &x)?, "{dt:?} round trip, shift {shift}");
                let gf = (&fused * &probe)?.sum_all()?.backward()?;
                let gp = (&plain * &probe)?.sum_all()?.backward()?;
                assert!(
                    same(gf.get(&x).unwrap(), gp.get(&x).unwrap())?,
                    "{dt:?} d partition"
                );
                // merge's gradient is the partition of the incoming gradient
                let m = Var::from_tensor(&plain)?;
                let probe_map = Tensor::randn(0f64, 1.0, (b, h, w, c), &dev)?.to_dtype(dt)?;
                let gm = (merge_windows(&m, ws, shift, (h, w))? * &probe_map)?
                    .sum_all()?
                    .backward()?;
                let want = partition_windows(&probe_map, ws, shift)?;
                assert!(same(gm.get(&m).unwrap(), &want)?, "{dt:?} d merge");
            }
        }
        Ok(())
    }

    fn same(a: &Tensor, b: &Tensor) -> Result<bool> {
        Ok(a.dims() == b.dims()
            && (a - b)?
                .abs()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                == 0.0)
    }

    /// Maps the windows do not divide (odd sizes, a map smaller than the window and than the
    /// shift): equal, bit for bit, to roll -> zero pad (bottom, right) -> partition, and back
    /// reverse -> crop -> roll, forward and backward (timm `SwinTransformerV2Block._attn`).
    #[test]
    fn padded_match_composed_roll_pad_partition_crop() -> Result<()> {
        let dev = Device::Cpu;
        let (b, c, ws) = (2, 3, 4);
        for dt in [DType::F32, DType::F64] {
            for (h, w) in [(9usize, 6usize), (5, 13), (2, 3), (1, 1)] {
                let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
                let n = b * (hp / ws) * (wp / ws);
                let x =
                    Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, h, w, c), &dev)?.to_dtype(dt)?)?;
                let probe = Tensor::randn(0f64, 1.0, (n, ws * ws, c), &dev)?.to_dtype(dt)?;
                for shift in [0, 2, 3] {
                    let s = shift as i32;
                    let padded = x
                        .roll(-s, 1)?
                        .roll(-s, 2)?
                        .pad_with_zeros(1, 0, hp - h)?
                        .pad_with_zeros(2, 0, wp - w)?;
                    let plain = window_partition(&padded, ws)?.reshape((n, ws * ws, c))?;
                    let fused = partition_windows_padded(&x, ws, shift)?;
                    let at = format!("{dt:?} {h}x{w} shift {shift}");
                    assert!(same(&fused, &plain)?, "{at}: partition");
                    let back = merge_windows_cropped(&fused, ws, shift, (h, w))?;
                    assert!(same(&back, &x)?, "{at}: round trip");
                    let gf = (&fused * &probe)?.sum_all()?.backward()?;
                    let gp = (&plain * &probe)?.sum_all()?.backward()?;
                    assert!(
                        same(gf.get(&x).unwrap(), gp.get(&x).unwrap())?,
                        "{at}: d partition"
                    );
                    let m = Var::from_tensor(&probe)?;
                    let crop = window_reverse(&m.reshape((n, ws, ws, c))?, ws, hp, wp)?
                        .narrow(1, 0, h)?
                        .narrow(2, 0, w)?
                        .roll(s, 1)?
                        .roll(s, 2)?;
                    let merged = merge_windows_cropped(&m, ws, shift, (h, w))?;
                    assert!(same(&merged, &crop)?, "{at}: merge");
                    let probe_map = Tensor::randn(0f64, 1.0, (b, h, w, c), &dev)?.to_dtype(dt)?;
                    let gm = (merged * &probe_map)?.sum_all()?.backward()?;
                    let gc = (crop * &probe_map)?.sum_all()?.backward()?;
                    assert!(
                        same(gm.get(&m).unwrap(), gc.get(&m).unwrap())?,
                        "{at}: d merge"
                    );
                }
            }
        }
        Ok(())
    }

    /// On a map the windows divide, the padded ops are the strict ones, bit for bit (the
    /// configured input size keeps today's numbers).
    #[test]
    fn padded_equal_strict_when_the_windows_divide() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 8, 12, 5), &dev)?;
        for shift in [0, 2] {
            let a = partition_windows(&x, 4, shift)?;
            let p = partition_windows_padded(&x, 4, shift)?;
            assert!(same(&a, &p)?);
            let back = merge_windows(&a, 4, shift, (8, 12))?;
            assert!(same(&back, &merge_windows_cropped(&a, 4, shift, (8, 12))?)?);
        }
        let e = partition_windows_padded(&x, 0, 0).unwrap_err().to_string();
        assert!(e.contains("cannot be cut into 0x0 windows"), "{e}");
        let w = Tensor::zeros((5, 16, 2), DType::F32, &dev)?;
        let e = merge_windows_cropped(&w, 4, 0, (5, 6))
            .unwrap_err()
            .to_string();
        assert!(e.contains("merge-windows: [5, 16, 2] is not"), "{e}");
        Ok(())
    }

    #[test]
    fn bad_grids_are_named() -> Result<()> {
        let x = Tensor::zeros((1, 6, 8, 2), DType::F32, &Device::Cpu)?;
        let e = partition_windows(&x, 4, 0).unwrap_err().to_string();
        assert!(
            e.contains("a 6x8 map does not split into 4x4 windows"),
            "{e}"
        );
        let w = Tensor::zeros((3, 16, 2), DType::F32, &Device::Cpu)?;
        let e = merge_windows(&w, 4, 0, (8, 8)).unwrap_err().to_string();
        assert!(e.contains("merge-windows: [3, 16, 2] is not"), "{e}");
        Ok(())
    }
}
