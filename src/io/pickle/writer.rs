//! Writing: the protocol-2 opcodes `torch.save` emits for a state dict.

/// Emits the protocol-2 pickle subset that `torch.save` uses for a state dict.
#[derive(Default)]
pub struct PickleWriter {
    buf: Vec<u8>,
}

impl PickleWriter {
    /// A writer that starts with `PROTO 2`.
    pub fn new() -> PickleWriter {
        PickleWriter { buf: vec![0x80, 2] }
    }

    /// `GLOBAL module\nname\n`.
    pub fn global(&mut self, module: &str, name: &str) {
        self.buf.push(b'c');
        for part in [module, name] {
            self.buf.extend_from_slice(part.as_bytes());
            self.buf.push(b'\n');
        }
    }

    /// `MARK`.
    pub fn mark(&mut self) {
        self.buf.push(b'(');
    }

    /// `TUPLE` (everything since the last mark).
    pub fn tuple(&mut self) {
        self.buf.push(b't');
    }

    /// A tuple of non-negative ints (`EMPTY_TUPLE`, `TUPLE1..3` or `MARK ... TUPLE`).
    pub fn int_tuple(&mut self, xs: &[u64]) {
        match xs.len() {
            0 => self.buf.push(b')'),
            1..=3 => {
                xs.iter().for_each(|&x| self.int(x));
                self.buf.push(0x84 + xs.len() as u8);
            }
            _ => {
                self.mark();
                xs.iter().for_each(|&x| self.int(x));
                self.tuple();
            }
        }
    }

    /// The smallest int opcode for `x` (`BININT1`, `BININT2`, `BININT`, `LONG1`).
    pub fn int(&mut self, x: u64) {
        if x < 0x100 {
            self.buf.extend_from_slice(&[b'K', x as u8]);
        } else if x < 0x1_0000 {
            self.buf.push(b'M');
            self.buf.extend_from_slice(&(x as u16).to_le_bytes());
        } else if x < 0x8000_0000 {
            self.buf.push(b'J');
            self.buf.extend_from_slice(&(x as u32).to_le_bytes());
        } else {
            // LONG1: two's-complement little-endian; a 9th zero byte keeps the sign bit clear
            // for values of 2^63 and more.
            let n: u8 = if x >> 63 == 0 { 8 } else { 9 };
            self.buf.extend_from_slice(&[0x8a, n]);
            self.buf.extend_from_slice(&x.to_le_bytes());
            if n == 9 {
                self.buf.push(0);
            }
        }
    }

    /// `BINUNICODE`.
    pub fn str(&mut self, s: &str) {
        self.buf.push(b'X');
        self.buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// Any single-byte opcode (`EMPTY_TUPLE`, `REDUCE`, `BINPERSID`, `NEWFALSE`, `SETITEMS`, ...).
    pub fn op(&mut self, op: u8) {
        self.buf.push(op);
    }

    /// Append `STOP` and return the bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.push(b'.');
        self.buf
    }
}
