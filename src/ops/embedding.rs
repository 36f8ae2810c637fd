//! Embedding lookup.

use super::tensor;
use crate::autograd::{Tape, Var};
use crate::device::cpu::embedding as k;
use crate::error::{Error, Result};

/// table [rows, dim], ids \[n\] -> [n, dim]. An id >= rows is an error naming it. Row
/// `padding_idx` receives no gradient (PyTorch's `nn.Embedding(padding_idx=..)`), even when that id
/// occurs in the input.
pub fn embedding(
    tape: &mut Tape,
    table: &Var,
    ids: &[u32],
    padding_idx: Option<u32>,
    what: &str,
) -> Result<Var> {
    let (rows, dim) = table.value().shape().dims2("embedding table")?;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
        return Err(Error::invalid(format!(
            "{what}: id {bad} is out of range for a table of {rows} rows"
        )));
    }
    let mut y = vec![0.0; ids.len() * dim];
    k::gather_fwd(table.value().f32s()?, ids, dim, &mut y);
    let out = tensor(y, &[ids.len(), dim])?;
    let ids = ids.to_vec();
    Ok(tape.record("embedding", &[table], out, move |dy| {
        let mut dt = vec![0.0; rows * dim];
        k::gather_bwd(dy.f32s()?, &ids, dim, &mut dt);
        if let Some(p) = padding_idx.map(|p| p as usize).filter(|&p| p < rows) {
            dt[p * dim..(p + 1) * dim].fill(0.0);
        }
        Ok(vec![Some(tensor(dt, &[rows, dim])?)])
    }))
}
