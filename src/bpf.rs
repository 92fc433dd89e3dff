//! The bpf(2) system call and eBPF code, written by hand: the few
//! commands lb uses (create and fill maps, load and attach programs), the
//! instruction encodings its programs need, a small assembler that resolves
//! forward jumps to labels, and the mapping of a map's memory into lb's.
//! `steer` and `redirect` build their programs from these.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

// The uapi numbers (linux/bpf.h, asm-generic/socket.h); libc has only some.
pub(crate) const BPF_MAP_CREATE: libc::c_long = 0;
pub(crate) const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
pub(crate) const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
pub(crate) const BPF_PROG_LOAD: libc::c_long = 5;
pub(crate) const BPF_PROG_ATTACH: libc::c_long = 8;
pub(crate) const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub(crate) const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;
pub(crate) const BPF_F_MMAPABLE: u32 = 1 << 10;
pub(crate) const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
pub(crate) const BPF_SK_REUSEPORT_SELECT: u32 = 39;
pub(crate) const BPF_MAP_TYPE_HASH: u32 = 1;
pub(crate) const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
pub(crate) const BPF_MAP_TYPE_RINGBUF: u32 = 27;
pub(crate) const BPF_PROG_TYPE_SK_SKB: u32 = 14;
pub(crate) const BPF_SK_SKB_VERDICT: u32 = 38;
pub(crate) const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;

/// `union bpf_attr`, as the commands used here lay it out; the
/// kernel takes a shorter or longer one as long as the rest is zero.
#[repr(C, align(8))]
pub(crate) struct Attr([u8; 128]);

impl Attr {
    pub(crate) fn new() -> Attr {
        Attr([0; 128])
    }

    pub(crate) fn put_u32(&mut self, at: usize, v: u32) -> &mut Attr {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    pub(crate) fn put_u64(&mut self, at: usize, v: u64) -> &mut Attr {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

pub(crate) fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr of the size given.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, std::mem::size_of::<Attr>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// For tests that load programs: whether this process may use bpf(2).
/// Root is needed, and not enough where a seccomp filter refuses the call
/// (containers run with a default profile).
#[cfg(test)]
pub(crate) fn allowed() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && map_create(BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0).is_ok()
}

pub(crate) fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this descriptor, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn map_create(kind: u32, key_size: u32, value_size: u32, entries: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.put_u32(0, kind).put_u32(4, key_size).put_u32(8, value_size).put_u32(12, entries).put_u32(16, flags);
    owned(bpf(BPF_MAP_CREATE, &mut a)?)
}

pub(crate) fn map_update(map: RawFd, key: u32, value: u64) -> io::Result<()> {
    let mut a = Attr::new();
    a.put_u32(0, map as u32)
        .put_u64(8, &key as *const u32 as u64)
        .put_u64(16, &value as *const u64 as u64)
        .put_u64(24, 0);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(drop)
}

/// Loads `code` as a program of `kind`; `attach` is the
/// `expected_attach_type` the kind needs (0 when it needs none).
pub(crate) fn prog_load(kind: u32, attach: u32, code: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut a = Attr::new();
    a.put_u32(0, kind)
        .put_u32(4, code.len() as u32)
        .put_u64(8, code.as_ptr() as u64)
        .put_u64(16, license.as_ptr() as u64)
        // log_level, log_size, log_buf, kern_version, prog_flags: 0;
        // prog_name (16 bytes) at 48, prog_ifindex at 64.
        .put_u32(68, attach);
    owned(bpf(BPF_PROG_LOAD, &mut a)?)
}

/// Attaches `prog` to `target` (a map, for the sockmap program kinds).
pub(crate) fn prog_attach(target: RawFd, prog: RawFd, attach: u32) -> io::Result<()> {
    let mut a = Attr::new();
    a.put_u32(0, target as u32).put_u32(4, prog as u32).put_u32(8, attach);
    bpf(BPF_PROG_ATTACH, &mut a).map(drop)
}

/// Sets `key` to `value` in `map`; both are the map's sizes.
pub(crate) fn map_put(map: RawFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut a = Attr::new();
    a.put_u32(0, map as u32).put_u64(8, key.as_ptr() as u64).put_u64(16, value.as_ptr() as u64).put_u64(24, 0);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(drop)
}

/// Removes `key` from `map`.
pub(crate) fn map_delete(map: RawFd, key: &[u8]) -> io::Result<()> {
    let mut a = Attr::new();
    a.put_u32(0, map as u32).put_u64(8, key.as_ptr() as u64);
    bpf(BPF_MAP_DELETE_ELEM, &mut a).map(drop)
}

/// A shared mapping of a map's memory (an mmap'able array's values, or a
/// ring buffer's pages), unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    at: *mut libc::c_void,
    len: usize,
}

// SAFETY: the memory is only reached through atomics by its users, and the
// mapping lives until drop.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(crate) fn new(map: RawFd, len: usize, offset: usize, writable: bool) -> io::Result<Mapping> {
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: mapping a BPF map's memory, which BPF_F_MMAPABLE arrays and
        // ring buffers allow; the kernel checks length and offset.
        let at = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, map, offset as libc::off_t) };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { at, len })
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.at.cast()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what new mapped, once.
        unsafe { libc::munmap(self.at, self.len) };
    }
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub(crate) code: u8,
    regs: u8,
    pub(crate) off: i16,
    imm: i32,
}

pub(crate) fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    // `dst_reg:4, src_reg:4` bit-fields: dst takes the low nibble on a
    // little-endian machine, the high one on a big-endian one.
    let regs = if cfg!(target_endian = "little") { (src << 4) | dst } else { (dst << 4) | src };
    Insn { code, regs, off, imm }
}

// Registers: r0 return, r1-r5 arguments (clobbered by calls), r6-r9 kept,
// r10 the frame pointer.
pub(crate) const R0: u8 = 0;
pub(crate) const R1: u8 = 1;
pub(crate) const R2: u8 = 2;
pub(crate) const R3: u8 = 3;
pub(crate) const R4: u8 = 4;
pub(crate) const R5: u8 = 5;
pub(crate) const R6: u8 = 6;
pub(crate) const R7: u8 = 7;
pub(crate) const R8: u8 = 8;
pub(crate) const R9: u8 = 9;
pub(crate) const FP: u8 = 10;

pub(crate) fn mov(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0) // ALU64 | MOV | X
}
pub(crate) fn mov_imm(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}
pub(crate) fn add(dst: u8, src: u8) -> Insn {
    insn(0x0f, dst, src, 0, 0)
}
pub(crate) fn add_imm(dst: u8, imm: i32) -> Insn {
    insn(0x07, dst, 0, 0, imm)
}
pub(crate) fn sub(dst: u8, src: u8) -> Insn {
    insn(0x1f, dst, src, 0, 0)
}
pub(crate) fn and(dst: u8, src: u8) -> Insn {
    insn(0x5f, dst, src, 0, 0)
}
pub(crate) fn xor(dst: u8, src: u8) -> Insn {
    insn(0xaf, dst, src, 0, 0)
}
pub(crate) fn xor_imm(dst: u8, imm: i32) -> Insn {
    insn(0xa7, dst, 0, 0, imm)
}
pub(crate) fn lsh_imm(dst: u8, imm: i32) -> Insn {
    insn(0x67, dst, 0, 0, imm)
}
pub(crate) fn arsh_imm(dst: u8, imm: i32) -> Insn {
    insn(0xc7, dst, 0, 0, imm)
}
pub(crate) fn load64(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x79, dst, src, off, 0) // LDX | MEM | DW
}
pub(crate) fn load8(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x71, dst, src, off, 0) // LDX | MEM | B
}
pub(crate) fn and_imm(dst: u8, imm: i32) -> Insn {
    insn(0x57, dst, 0, 0, imm)
}
pub(crate) fn store32_imm(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x62, dst, 0, off, imm) // ST | MEM | W
}
pub(crate) fn store32(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x63, dst, src, off, 0) // STX | MEM | W
}
pub(crate) fn atomic_add64(dst: u8, src: u8, off: i16) -> Insn {
    insn(0xdb, dst, src, off, 0) // STX | ATOMIC | DW, imm BPF_ADD
}
/// `ld_imm64` of a map's descriptor: two instructions.
pub(crate) fn load_map(dst: u8, map: RawFd) -> [Insn; 2] {
    [insn(0x18, dst, 1 /* BPF_PSEUDO_MAP_FD */, 0, map), insn(0, 0, 0, 0, 0)]
}
pub(crate) fn jump_if_zero(reg: u8, off: i16) -> Insn {
    insn(0x15, reg, 0, off, 0) // JMP | JEQ | K
}
pub(crate) fn jump_if_not(reg: u8, imm: i32, off: i16) -> Insn {
    insn(0x55, reg, 0, off, imm) // JMP | JNE | K
}
pub(crate) fn jump_if_beyond(reg: u8, limit: u8, off: i16) -> Insn {
    insn(0x2d, reg, limit, off, 0) // JMP | JGT | X
}
pub(crate) fn jump_if_above(reg: u8, imm: i32, off: i16) -> Insn {
    insn(0x25, reg, 0, off, imm) // JMP | JGT | K
}
pub(crate) fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper)
}
pub(crate) fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0)
}

/// Helper ids and verdicts shared by lb's programs (linux/bpf.h).
pub(crate) const MAP_LOOKUP_ELEM: i32 = 1;
pub(crate) const SK_DROP: i32 = 0;
pub(crate) const SK_PASS: i32 = 1;

pub(crate) fn load32(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x61, dst, src, off, 0) // LDX | MEM | W
}
pub(crate) fn store64(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x7b, dst, src, off, 0) // STX | MEM | DW
}
pub(crate) fn jump_if_at_least(reg: u8, imm: i32, off: i16) -> Insn {
    insn(0x35, reg, 0, off, imm) // JMP | JGE | K
}

/// A jump's destination in an [`Asm`], bound to an instruction later.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Label(usize);

/// Builds a program with forward jumps to labels, so the offsets are
/// computed, not counted by hand.
#[derive(Debug, Default)]
pub(crate) struct Asm {
    code: Vec<Insn>,
    labels: Vec<Option<usize>>,
    jumps: Vec<(usize, Label)>,
}

impl Asm {
    pub(crate) fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `l` to the next instruction.
    pub(crate) fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.code.len());
    }

    pub(crate) fn push(&mut self, i: Insn) {
        self.code.push(i);
    }

    pub(crate) fn extend(&mut self, is: impl IntoIterator<Item = Insn>) {
        self.code.extend(is);
    }

    /// Pushes the jump `i`, whose offset is set to reach `to`.
    pub(crate) fn jump(&mut self, i: Insn, to: Label) {
        self.jumps.push((self.code.len(), to));
        self.code.push(i);
    }

    /// The program. Panics on a label never bound or a backward jump: a
    /// bug in the program's builder, found by its tests.
    pub(crate) fn finish(mut self) -> Vec<Insn> {
        for (at, to) in self.jumps {
            let target = self.labels[to.0].expect("every label is bound");
            assert!(target > at, "eBPF programs here only jump forward");
            self.code[at].off = i16::try_from(target - at - 1).expect("a jump within 32k instructions");
        }
        self.code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jump_reaches_the_instruction_its_label_was_bound_to() {
        let mut a = Asm::default();
        let out = a.label();
        a.jump(jump_if_zero(R0, 0), out);
        a.push(mov_imm(R0, 1));
        a.push(mov_imm(R0, 2));
        a.bind(out);
        a.push(exit());
        let p = a.finish();
        assert_eq!(p[0].off, 2, "skips the two moves");
        assert_eq!(p[3].code, 0x95);
    }
}
