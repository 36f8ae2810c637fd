//! Losses over logits rows: hard-target cross-entropy (MLM, InfoNCE) and soft-target
//! cross-entropy (knowledge distillation), with log-sum-exp in f64.

/// Targets equal to this are ignored (PyTorch's ignore_index).
pub const IGNORE_INDEX: i64 = -100;

fn row_lse(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln()
}

/// Mean over non-ignored rows of -log softmax(logits\[r\])[target\[r\]]. Returns (loss, count) and
/// fills `lse` \[rows\]. With no counted row the loss is 0.
pub fn cross_entropy_fwd(
    logits: &[f32],
    targets: &[i64],
    classes: usize,
    lse: &mut [f32],
) -> (f32, usize) {
    let mut total = 0.0f64;
    let mut count = 0;
    for (r, row) in logits.chunks_exact(classes).enumerate() {
        let l = row_lse(row);
        lse[r] = l as f32;
        let t = targets[r];
        if t == IGNORE_INDEX {
            continue;
        }
        total += l - row[t as usize] as f64;
        count += 1;
    }
    let loss = if count == 0 {
        0.0
    } else {
        total / count as f64
    };
    (loss as f32, count)
}

/// Backward: dlogits = g / count · (softmax - onehot) on counted rows, 0 elsewhere (assigned).
pub fn cross_entropy_bwd(
    logits: &[f32],
    targets: &[i64],
    classes: usize,
    lse: &[f32],
    count: usize,
    g: f32,
    dlogits: &mut [f32],
) {
    let scale = if count == 0 {
        0.0
    } else {
        g as f64 / count as f64
    };
    for (r, (row, drow)) in logits
        .chunks_exact(classes)
        .zip(dlogits.chunks_exact_mut(classes))
        .enumerate()
    {
        let t = targets[r];
        if t == IGNORE_INDEX {
            drow.iter_mut().for_each(|x| *x = 0.0);
            continue;
        }
        for (c, (d, &v)) in drow.iter_mut().zip(row).enumerate() {
            let p = (v as f64 - lse[r] as f64).exp();
            let onehot = if c as i64 == t { 1.0 } else { 0.0 };
            *d = (scale * (p - onehot)) as f32;
        }
    }
}

/// Mean over rows of -Σ_c target\[r,c\] · log softmax(logits\[r\])\[c\] (targets are probabilities).
pub fn soft_cross_entropy_fwd(
    logits: &[f32],
    targets: &[f32],
    classes: usize,
    lse: &mut [f32],
) -> f32 {
    let rows = logits.len() / classes.max(1);
    let mut total = 0.0f64;
    for (r, (row, trow)) in logits
        .chunks_exact(classes)
        .zip(targets.chunks_exact(classes))
        .enumerate()
    {
        let l = row_lse(row);
        lse[r] = l as f32;
        for (&v, &t) in row.iter().zip(trow) {
            if t != 0.0 {
                total -= t as f64 * (v as f64 - l);
            }
        }
    }
    if rows == 0 {
        0.0
    } else {
        (total / rows as f64) as f32
    }
}

/// Backward of [`soft_cross_entropy_fwd`]: dlogits = g / rows · (softmax · Σt - t) (assigned).
pub fn soft_cross_entropy_bwd(
    logits: &[f32],
    targets: &[f32],
    classes: usize,
    lse: &[f32],
    g: f32,
    dlogits: &mut [f32],
) {
    let rows = logits.len() / classes.max(1);
    let scale = if rows == 0 {
        0.0
    } else {
        g as f64 / rows as f64
    };
    for (r, ((row, trow), drow)) in logits
        .chunks_exact(classes)
        .zip(targets.chunks_exact(classes))
        .zip(dlogits.chunks_exact_mut(classes))
        .enumerate()
    {
        let tsum: f64 = trow.iter().map(|&t| t as f64).sum();
        for ((d, &v), &t) in drow.iter_mut().zip(row).zip(trow) {
            let p = (v as f64 - lse[r] as f64).exp();
            *d = (scale * (p * tsum - t as f64)) as f32;
        }
    }
}
