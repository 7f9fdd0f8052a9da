//! The host math of `taproot sample`'s decoder: one position at a time, in f32, row-major as
//! taproot keeps weights (a linear layer's weight is (OC, C)). Each block kind's decoder
//! (`kinds::*::host_block`) is written with these.

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// out (OC) = w (OC, C) · x (C) (+ b).
pub fn linear(w: &[f32], b: Option<&[f32]>, x: &[f32]) -> Vec<f32> {
    let c = x.len();
    let out = w.chunks_exact(c).map(|row| dot(row, x));
    match b {
        Some(b) => out.zip(b).map(|(o, bias)| o + bias).collect(),
        None => out.collect(),
    }
}

pub fn layernorm(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let r = 1.0 / (var + 1e-5).sqrt();
    x.iter().zip(w).zip(b).map(|((v, w), b)| (v - mean) * r * w + b).collect()
}

pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let r = 1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

/// Rotary position `pos` on each head of `x` (heads of `hd`): the training kernels' rotation.
pub fn rotate(x: &mut [f32], hd: usize, pos: usize, theta: f32) {
    let half = hd / 2;
    for head in x.chunks_exact_mut(hd) {
        for i in 0..half {
            let a = pos as f64 * (theta as f64).powf(-2.0 * i as f64 / hd as f64);
            let (c, s) = (a.cos() as f32, a.sin() as f32);
            let (x0, x1) = (head[i], head[i + half]);
            head[i] = x0 * c - x1 * s;
            head[i + half] = x1 * c + x0 * s;
        }
    }
}

pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044715 * x * x * x)).tanh())
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// down(silu(gate(x)) · up(x)) with [gate | up] stacked in `gate_up`.
pub fn swiglu_mlp(gate_up: &[f32], down: &[f32], x: &[f32]) -> Vec<f32> {
    let gu = linear(gate_up, None, x);
    let f = gu.len() / 2;
    let m: Vec<f32> = (0..f).map(|i| silu(gu[i]) * gu[f + i]).collect();
    linear(down, None, &m)
}

/// Causal attention of one new position over the cache: query heads `q` (NH·hd), cached keys
/// and values (positions × KV·hd); query head h reads key/value head h / (NH / KV).
pub fn attend(q: &[f32], k: &[f32], v: &[f32], nh: usize, kv: usize, hd: usize) -> Vec<f32> {
    let (scale, width, group) = (1.0 / (hd as f32).sqrt(), kv * hd, nh / kv);
    let positions = k.len() / width;
    let mut y = vec![0.0f32; nh * hd];
    for head in 0..nh {
        let o = (head / group) * hd;
        let qh = &q[head * hd..(head + 1) * hd];
        let scores: Vec<f32> = (0..positions).map(|j| dot(qh, &k[j * width + o..j * width + o + hd]) * scale).collect();
        let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f32 = e.iter().sum();
        for (j, p) in e.iter().enumerate() {
            let vj = &v[j * width + o..j * width + o + hd];
            for (out, vv) in y[head * hd..(head + 1) * hd].iter_mut().zip(vj) {
                *out += p / z * vv;
            }
        }
    }
    y
}
