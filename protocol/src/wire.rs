//! Primitive field readers and writers shared by every frame: big-endian integers,
//! `u16`-prefixed strings, `u32`-prefixed byte strings and header lists.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::ProtocolError;
use crate::text::Text;

/// Reads fields off one frame body, remembering where it is so errors can say so.
pub(crate) struct Reader {
    body: Bytes,
    pos: usize,
    frame: &'static str,
}

impl Reader {
    pub(crate) fn new(frame: &'static str, body: Bytes) -> Self {
        Self {
            body,
            pos: 0,
            frame,
        }
    }

    fn remaining(&self) -> usize {
        self.body.len() - self.pos
    }

    fn take(&mut self, field: &'static str, need: usize) -> Result<Bytes, ProtocolError> {
        let have = self.remaining();
        if need > have {
            return Err(ProtocolError::UnexpectedEof {
                frame: self.frame,
                field,
                offset: self.pos,
                need,
                have,
            });
        }
        let out = self.body.slice(self.pos..self.pos + need);
        self.pos += need;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ProtocolError> {
        let have = self.remaining();
        if N > have {
            return Err(ProtocolError::UnexpectedEof {
                frame: self.frame,
                field,
                offset: self.pos,
                need: N,
                have,
            });
        }
        let mut out = [0u8; N];
        out.copy_from_slice(&self.body[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, ProtocolError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, ProtocolError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// `len:u16` then that many bytes of UTF-8.
    pub(crate) fn text(&mut self, field: &'static str) -> Result<Text, ProtocolError> {
        let len = usize::from(self.u16(field)?);
        let offset = self.pos;
        let bytes = self.take(field, len)?;
        Text::from_utf8(bytes).map_err(|_| ProtocolError::InvalidUtf8 {
            frame: self.frame,
            field,
            offset,
        })
    }

    /// `len:u32` then that many bytes.
    pub(crate) fn bytes(&mut self, field: &'static str) -> Result<Bytes, ProtocolError> {
        let len = self.u32(field)?;
        let len = usize::try_from(len).map_err(|_| self.invalid(field, u64::from(len)))?;
        self.take(field, len)
    }

    /// Everything left in the body (the payload of frames that end in one).
    pub(crate) fn rest(&mut self) -> Bytes {
        let out = self.body.slice(self.pos..);
        self.pos = self.body.len();
        out
    }

    /// A `count` read off the wire, turned into a capacity that cannot exceed what
    /// the remaining body could possibly hold at `min_item` bytes per item.
    pub(crate) fn capacity(&self, count: usize, min_item: usize) -> usize {
        count.min(self.remaining() / min_item.max(1))
    }

    /// `count:u16` then `count` × (key, value).
    pub(crate) fn headers(&mut self) -> Result<Vec<(Text, Text)>, ProtocolError> {
        let count = usize::from(self.u16("header_count")?);
        let mut out = Vec::with_capacity(self.capacity(count, 4));
        for _ in 0..count {
            let key = self.text("header_key")?;
            let value = self.text("header_value")?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// `count:u16` then `count` strings.
    pub(crate) fn text_list(&mut self, field: &'static str) -> Result<Vec<Text>, ProtocolError> {
        let count = usize::from(self.u16(field)?);
        let mut out = Vec::with_capacity(self.capacity(count, 2));
        for _ in 0..count {
            out.push(self.text(field)?);
        }
        Ok(out)
    }

    pub(crate) fn invalid(&self, field: &'static str, value: u64) -> ProtocolError {
        ProtocolError::InvalidValue {
            frame: self.frame,
            field,
            value,
        }
    }

    /// Fails if bytes are left over.
    pub(crate) fn finish(self) -> Result<(), ProtocolError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(ProtocolError::TrailingBytes {
                frame: self.frame,
                count,
            }),
        }
    }
}

/// Writes fields into an output buffer; only length overflows can fail.
pub(crate) struct Writer<'a> {
    pub(crate) dst: &'a mut BytesMut,
    pub(crate) frame: &'static str,
}

impl Writer<'_> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.dst.put_u8(v);
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.dst.put_u16(v);
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.dst.put_u32(v);
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.dst.put_u64(v);
    }

    fn too_long(&self, field: &'static str, len: usize, max: usize) -> ProtocolError {
        ProtocolError::TooLongToEncode {
            frame: self.frame,
            field,
            len,
            max,
        }
    }

    pub(crate) fn count16(&mut self, field: &'static str, len: usize) -> Result<(), ProtocolError> {
        let n = u16::try_from(len).map_err(|_| self.too_long(field, len, usize::from(u16::MAX)))?;
        self.dst.put_u16(n);
        Ok(())
    }

    pub(crate) fn count32(&mut self, field: &'static str, len: usize) -> Result<(), ProtocolError> {
        let n = u32::try_from(len).map_err(|_| self.too_long(field, len, u32::MAX as usize))?;
        self.dst.put_u32(n);
        Ok(())
    }

    pub(crate) fn text(&mut self, field: &'static str, s: &str) -> Result<(), ProtocolError> {
        self.count16(field, s.len())?;
        self.dst.put_slice(s.as_bytes());
        Ok(())
    }

    pub(crate) fn bytes(&mut self, field: &'static str, b: &[u8]) -> Result<(), ProtocolError> {
        self.count32(field, b.len())?;
        self.dst.put_slice(b);
        Ok(())
    }

    pub(crate) fn raw(&mut self, b: &[u8]) {
        self.dst.put_slice(b);
    }

    pub(crate) fn headers(&mut self, headers: &[(Text, Text)]) -> Result<(), ProtocolError> {
        self.count16("header_count", headers.len())?;
        for (k, v) in headers {
            self.text("header_key", k)?;
            self.text("header_value", v)?;
        }
        Ok(())
    }

    pub(crate) fn text_list(
        &mut self,
        field: &'static str,
        items: &[Text],
    ) -> Result<(), ProtocolError> {
        self.count16(field, items.len())?;
        for item in items {
            self.text(field, item)?;
        }
        Ok(())
    }
}
