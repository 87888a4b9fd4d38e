//! One layer's cached keys and values, preallocated and written in place.
//!
//! Appending by `Tensor::cat` copies the whole cache at every token of every layer (O(L) per
//! token). [`KvBuffer`] keeps `[B, H, capacity, d]` buffers, writes new positions into them
//! (`slice_set`), and hands out views of the first `len` positions; the capacity doubles when
//! it runs out. Rolling back ([`KvBuffer::truncate`]) only moves `len`. Keeping chosen
//! positions ([`KvBuffer::keep`]) and reordering batch rows ([`KvBuffer::reorder`]) copy into
//! fresh buffers, so views handed out earlier never change under their holders.
//!
//! Keys and values that are part of a training graph are concatenated instead, as in-place
//! writes have no backward.
//!
//! Clones share the buffers: a clone may append (past the original's `len`, where the
//! original never reads), as verifying a draft against a copy of the cache does; it must not
//! be appended to by both sides and then read by both.

use candle_core::{Result, Tensor};

/// The smallest capacity allocated.
const MIN_CAPACITY: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct KvBuffer {
    /// `[B, H, capacity, d]` keys and values; `None` before the first append.
    buffers: Option<(Tensor, Tensor)>,
    len: usize,
}

impl KvBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cached keys and values `[B, H, len, d]`, if any.
    pub fn get(&self) -> Result<Option<(Tensor, Tensor)>> {
        match &self.buffers {
            Some((k, v)) if self.len > 0 => {
                Ok(Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?)))
            }
            _ => Ok(None),
        }
    }

    /// Appends `k`, `v` `[B, H, l, d]` after the cached positions and returns every cached
    /// key and value `[B, H, len + l, d]`.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if k.track_op() || v.track_op() {
            // Training: in-place writes have no backward, so the keys and values are joined
            // as tensors of the graph.
            let (nk, nv) = match self.get()? {
                Some((ok, ov)) => (Tensor::cat(&[&ok, k], 2)?, Tensor::cat(&[&ov, v], 2)?),
                None => (k.clone(), v.clone()),
            };
            self.len = nk.dim(2)?;
            self.buffers = Some((nk.clone(), nv.clone()));
            return Ok((nk, nv));
        }
        let (b, h, l, d) = k.dims4()?;
        let need = self.len + l;
        let fits = match &self.buffers {
            Some((bk, _)) => {
                let (bb, bh, cap, bd) = bk.dims4()?;
                (bb, bh, bd) == (b, h, d) && cap >= need && bk.dtype() == k.dtype()
            }
            None => false,
        };
        if !fits {
            let cap = match &self.buffers {
                Some((bk, _)) => bk.dim(2)? * 2,
                None => 0,
            }
            .max(need)
            .max(MIN_CAPACITY);
            let zeros = || Tensor::zeros((b, h, cap, d), k.dtype(), k.device());
            let (nk, nv) = (zeros()?, zeros()?);
            if let Some((old_k, old_v)) = self.get()? {
                nk.slice_set(&old_k.contiguous()?, 2, 0)?;
                nv.slice_set(&old_v.contiguous()?, 2, 0)?;
            }
            self.buffers = Some((nk, nv));
        }
        let (bk, bv) = self.buffers.as_ref().expect("allocated above");
        bk.slice_set(&k.contiguous()?, 2, self.len)?;
        bv.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = need;
        Ok((bk.narrow(2, 0, need)?, bv.narrow(2, 0, need)?))
    }

    /// Drops every cached position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Keeps the positions `index` (in that order), dropping the rest.
    pub fn keep(&mut self, index: &Tensor) -> Result<()> {
        let Some((k, v)) = self.get()? else {
            return Ok(());
        };
        let (k, v) = (
            k.contiguous()?.index_select(index, 2)?,
            v.contiguous()?.index_select(index, 2)?,
        );
        self.len = k.dim(2)?;
        self.buffers = Some((k.contiguous()?, v.contiguous()?));
        Ok(())
    }

    /// Rearranges the batch rows (beam search).
    pub fn reorder(&mut self, rows: &Tensor) -> Result<()> {
        if let Some((k, v)) = self.buffers.take() {
            self.buffers = Some((k.index_select(rows, 0)?, v.index_select(rows, 0)?));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ramp(start: f32, l: usize) -> Tensor {
        let data: Vec<f32> = (0..2 * l * 3).map(|i| start + i as f32).collect();
        Tensor::from_vec(data, (1, 2, l, 3), &Device::Cpu).unwrap()
    }

    /// Appending, past the capacity too, equals concatenation; truncate, keep and reorder do
    /// what they say, and earlier views stay as they were.
    #[test]
    fn appends_equal_concatenation_and_views_stay_valid() {
        let mut cache = KvBuffer::new();
        let mut all: Option<Tensor> = None;
        let mut first_view = None;
        for (i, l) in [5usize, 1, 70, 1, 3].into_iter().enumerate() {
            let k = ramp(100.0 * i as f32, l);
            let (ck, cv) = cache.append(&k, &(&k * 2.0).unwrap()).unwrap();
            let want = match all.take() {
                Some(a) => Tensor::cat(&[&a, &k], 2).unwrap(),
                None => k.clone(),
            };
            let got: Vec<f32> = ck.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            let got_v: Vec<f32> = cv.flatten_all().unwrap().to_vec1().unwrap();
            let want_v = (&want * 2.0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got_v, want_v);
            if i == 0 {
                first_view = Some((ck.clone(), got));
            }
            all = Some(want);
        }
        cache.truncate(4);
        let (k, _) = cache.get().unwrap().unwrap();
        assert_eq!(k.dim(2).unwrap(), 4);
        let index = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        cache.keep(&index).unwrap();
        let (k, _) = cache.get().unwrap().unwrap();
        let all = all.unwrap();
        let want = all.index_select(&index, 2).unwrap();
        assert_eq!(
            k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // The first view still reads the first five positions.
        let (view, values) = first_view.unwrap();
        assert_eq!(
            view.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            values
        );
    }
}
