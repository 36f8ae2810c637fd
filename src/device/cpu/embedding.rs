//! Embedding gather (forward) and scatter-add (backward).

/// out[i, :] = table[ids\[i\], :]. Ids must be < rows (checked by the op layer).
pub fn gather_fwd(table: &[f32], ids: &[u32], dim: usize, out: &mut [f32]) {
    for (row, &id) in out.chunks_exact_mut(dim).zip(ids) {
        let id = id as usize;
        row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    }
}

/// dtable[ids\[i\], :] += dout[i, :] (rows hit several times accumulate).
pub fn gather_bwd(dout: &[f32], ids: &[u32], dim: usize, dtable: &mut [f32]) {
    for (row, &id) in dout.chunks_exact(dim).zip(ids) {
        let id = id as usize;
        for (d, &g) in dtable[id * dim..(id + 1) * dim].iter_mut().zip(row) {
            *d += g;
        }
    }
}
