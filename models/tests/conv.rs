//! `layers::Conv2d`'s CPU path (im2col + the fused linear op) against candle's own conv2d:
//! outputs and the gradients of input, weight and bias, for 1x1 and 3x3 kernels, with and without
//! padding and stride.
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Init, VarMap};
use mimlab_engine::init::seeded_var_builder;
use mimlab_models::layers::Conv2d;

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Relative to the reference's largest magnitude: f32 sums in another order.
fn close(what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    let scale = want
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?
        .max(1.0);
    let d = max_abs(got, want)?;
    assert!(
        d <= 2e-5 * scale,
        "{what}: max abs diff {d} (scale {scale})"
    );
    Ok(())
}

#[test]
fn im2col_conv_matches_candle_forward_and_backward() -> Result<()> {
    let dev = Device::Cpu;
    // (in, out, k, stride, padding, h, w): candle's strided backward is only right where height
    // and width leave the same remainder, so the strided cases are square
    let cases = [
        (3, 5, 1, 1, 0, 6, 7),
        (4, 6, 3, 1, 1, 7, 5),
        (2, 3, 3, 1, 0, 6, 8),
        (3, 4, 3, 2, 1, 9, 9),
        (3, 4, 3, 2, 1, 8, 8),
        (3, 2, 1, 2, 0, 7, 7),
    ];
    for (n, &(i, o, k, s, p, h, w)) in cases.iter().enumerate() {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, n as u64, DType::F32, &dev);
        let init = Init::Uniform { lo: -1.0, up: 1.0 };
        let conv = Conv2d::new(i, o, k, s, p, init, Some(init), vb.pp("c"))?;
        let vars = vm.data().lock().unwrap().clone();
        let (wt, bt) = (&vars["c.weight"], &vars["c.bias"]);
        let xs: Vec<f32> = (0..2 * i * h * w)
            .map(|j| ((j * 37 + n) % 23) as f32 / 11.0 - 1.0)
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(xs, (2, i, h, w), &dev)?)?;
        let y = conv.forward(x.as_tensor())?;
        let want = x
            .as_tensor()
            .conv2d(wt.as_tensor(), p, s, 1, 1)?
            .broadcast_add(&bt.as_tensor().reshape((1, o, 1, 1))?)?;
        let case = format!("case {n} ({i}->{o}, k{k} s{s} p{p}, {h}x{w})");
        assert_eq!(y.dims(), want.dims(), "{case}");
        close(&format!("{case} output"), &y, &want)?;
        // a weighting of the outputs that differs per position, so each gradient entry is checked
        let r = Tensor::arange(0f32, y.elem_count() as f32, &dev)?
            .reshape(y.dims())?
            .affine(0.013, -0.4)?
            .sin()?;
        let g = (y * &r)?.sum_all()?.backward()?;
        let gw = (want * &r)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("weight", wt), ("bias", bt)] {
            let a = g
                .get(v)
                .with_context(|| format!("{case}: no {name} grad"))?;
            let b = gw
                .get(v)
                .with_context(|| format!("{case}: no ref {name} grad"))?;
            close(&format!("{case} d{name}"), a, b)?;
        }
    }
    Ok(())
}

#[test]
fn a_map_smaller_than_the_kernel_is_an_error() -> Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &dev);
    let conv = Conv2d::new(2, 2, 3, 1, 0, Init::Const(1.0), None, vb)?;
    let err = conv
        .forward(&Tensor::zeros((1, 2, 2, 5), DType::F32, &dev)?)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2x5 map smaller than the 3x3 kernel"), "{err}");
    Ok(())
}
