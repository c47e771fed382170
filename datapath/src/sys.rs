//! The `bpf(2)` calls ferrite makes after loading: every call goes through
//! [`bpf`], which names the command in its error.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use thiserror::Error;

/// A failed `bpf(2)` command.
#[derive(Debug, Error)]
#[error("bpf({call}): {source}")]
pub struct SysError {
    /// The command, e.g. `BPF_MAP_UPDATE_ELEM`.
    pub call: &'static str,
    #[source]
    pub source: io::Error,
}

impl SysError {
    /// The errno, if the kernel returned one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

const BPF_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_MAP_UPDATE_ELEM: i32 = 2;
const BPF_MAP_DELETE_ELEM: i32 = 3;
const BPF_MAP_GET_NEXT_KEY: i32 = 4;
const BPF_OBJ_GET: i32 = 7;
const BPF_PROG_TEST_RUN: i32 = 10;
const BPF_OBJ_GET_INFO_BY_FD: i32 = 15;
const BPF_PROG_ATTACH: i32 = 8;
const BPF_PROG_DETACH: i32 = 9;
const BPF_PROG_GET_FD_BY_ID: i32 = 13;
const BPF_PROG_QUERY: i32 = 16;
const BPF_OBJ_PIN: i32 = 6;
const BPF_LINK_CREATE: i32 = 28;
const BPF_LINK_UPDATE: i32 = 29;

/// `BPF_TCX_INGRESS` / `BPF_TCX_EGRESS` (enum bpf_attach_type, Linux 6.6).
pub(crate) const BPF_TCX_INGRESS: u32 = 46;
pub(crate) const BPF_TCX_EGRESS: u32 = 47;
/// `BPF_F_REPLACE`: swap `replace_bpf_fd` for the new program in one step.
const BPF_F_REPLACE: u32 = 1 << 2;

/// `BPF_ANY`: create or update.
pub(crate) const BPF_ANY: u64 = 0;
/// `BPF_NOEXIST`: create only.
pub(crate) const BPF_NOEXIST: u64 = 1;

/// Issues one `bpf(2)` command; `attr` is the command's part of `union bpf_attr`.
fn bpf<T>(cmd: i32, call: &'static str, attr: &mut T) -> Result<i64, SysError> {
    // SAFETY: attr is a live, initialised #[repr(C)] value of the layout the
    // command expects; the kernel reads and writes at most size_of::<T>() bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(SysError {
            call,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(ret)
    }
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Opens a pinned object (program or map).
pub(crate) fn obj_get(path: &CString) -> Result<OwnedFd, SysError> {
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, "BPF_OBJ_GET", &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins `fd` (a program, map or link) at `path` on a bpf filesystem.
pub(crate) fn obj_pin(fd: BorrowedFd<'_>, path: &CString) -> Result<(), SysError> {
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, "BPF_OBJ_PIN", &mut attr).map(drop)
}

/// `link_create` of `union bpf_attr`, padded to the size of its largest
/// target-specific part: the kernel wants the bytes it does not read zero.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 6],
}

/// A link attaching `prog` to the cgroup directory `cgroup` at
/// `attach_type` (one of the BPF_CGROUP_* hooks), after whatever other
/// programs run there. It lasts while a descriptor or a pin holds it.
pub(crate) fn cgroup_link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> Result<OwnedFd, SysError> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    let fd = bpf(BPF_LINK_CREATE, "BPF_LINK_CREATE", &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Swaps the program of `link` for `prog` in one step.
pub(crate) fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> Result<(), SysError> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, "BPF_LINK_UPDATE", &mut attr).map(drop)
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn map_elem(
    cmd: i32,
    call: &'static str,
    map: BorrowedFd<'_>,
    key: *const u8,
    value: *const u8,
    flags: u64,
) -> Result<(), SysError> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags,
    };
    bpf(cmd, call, &mut attr).map(drop)
}

/// Looks `key` up; `Ok(false)` if absent. `value` must be the map's value size
/// (times the number of possible CPUs for per-CPU maps).
pub(crate) fn map_lookup(
    map: BorrowedFd<'_>,
    key: &[u8],
    value: &mut [u8],
) -> Result<bool, SysError> {
    match map_elem(
        BPF_MAP_LOOKUP_ELEM,
        "BPF_MAP_LOOKUP_ELEM",
        map,
        key.as_ptr(),
        value.as_mut_ptr(),
        0,
    ) {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

pub(crate) fn map_update(
    map: BorrowedFd<'_>,
    key: &[u8],
    value: &[u8],
    flags: u64,
) -> Result<(), SysError> {
    map_elem(
        BPF_MAP_UPDATE_ELEM,
        "BPF_MAP_UPDATE_ELEM",
        map,
        key.as_ptr(),
        value.as_ptr(),
        flags,
    )
}

/// Deletes `key`; `Ok(false)` if it was not there.
pub(crate) fn map_delete(map: BorrowedFd<'_>, key: &[u8]) -> Result<bool, SysError> {
    match map_elem(
        BPF_MAP_DELETE_ELEM,
        "BPF_MAP_DELETE_ELEM",
        map,
        key.as_ptr(),
        std::ptr::null(),
        0,
    ) {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The key after `key` (the first key when `key` is `None`); `Ok(false)` at the end.
pub(crate) fn map_next_key(
    map: BorrowedFd<'_>,
    key: Option<&[u8]>,
    next: &mut [u8],
) -> Result<bool, SysError> {
    match map_elem(
        BPF_MAP_GET_NEXT_KEY,
        "BPF_MAP_GET_NEXT_KEY",
        map,
        key.map_or(std::ptr::null(), <[u8]>::as_ptr),
        next.as_mut_ptr(),
        0,
    ) {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The kernel id of a program (`bpf_prog_info.id`), as tc filters report it.
pub(crate) fn prog_id(prog: BorrowedFd<'_>) -> Result<u32, SysError> {
    // struct bpf_prog_info starts with { __u32 type; __u32 id; ... }; the
    // kernel fills only the prefix we pass.
    let mut info = [0u32; 2];
    let mut attr = InfoAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: size_of::<[u32; 2]>() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, "BPF_OBJ_GET_INFO_BY_FD", &mut attr)?;
    Ok(info[1])
}

/// The id of the program `link` runs (`bpf_link_info.prog_id`).
pub(crate) fn link_prog_id(link: BorrowedFd<'_>) -> Result<u32, SysError> {
    // struct bpf_link_info starts with { __u32 type; __u32 id; __u32 prog_id; }.
    let mut info = [0u32; 3];
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<[u32; 3]>() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, "BPF_OBJ_GET_INFO_BY_FD", &mut attr)?;
    Ok(info[2])
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Offset of `ifindex` in `struct __sk_buff`; the fields before it must be 0.
const SKB_IFINDEX_OFFSET: usize = 40;

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (a TC_ACT_* verdict for ferrite's programs).
    pub verdict: i32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Run time reported by the kernel, in nanoseconds.
    pub duration_ns: u32,
}

/// Runs a tc program once on `packet`, as if received on `ifindex` (which
/// must be 1, the loopback device, or an existing device in this netns).
pub(crate) fn prog_test_run(
    prog: BorrowedFd<'_>,
    packet: &[u8],
    ifindex: u32,
) -> Result<TestRun, SysError> {
    let mut ctx = [0u8; SKB_IFINDEX_OFFSET + 4];
    ctx[SKB_IFINDEX_OFFSET..].copy_from_slice(&ifindex.to_ne_bytes());
    // Room for programs that grow the packet (ferrite's do not).
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ctx_size_in: ctx.len() as u32,
        ctx_in: ctx.as_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, "BPF_PROG_TEST_RUN", &mut attr)?;
    out.truncate(attr.data_size_out as usize);
    Ok(TestRun {
        verdict: attr.retval as i32,
        packet: out,
        duration_ns: attr.duration,
    })
}

#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_ifindex: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    relative_fd: u32,
    expected_revision: u64,
}

/// Attaches `prog` to device `ifindex` at a TCX hook (`attach_type`), last
/// in the chain, or in place of `replace` in one step. Without a link the
/// attachment lives as long as the device, like a tc filter.
pub(crate) fn tcx_attach(
    ifindex: u32,
    attach_type: u32,
    prog: BorrowedFd<'_>,
    replace: Option<BorrowedFd<'_>>,
) -> Result<(), SysError> {
    let mut attr = AttachAttr {
        target_ifindex: ifindex,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    if let Some(old) = replace {
        attr.attach_flags = BPF_F_REPLACE;
        attr.replace_bpf_fd = old.as_raw_fd() as u32;
    }
    bpf(BPF_PROG_ATTACH, "BPF_PROG_ATTACH", &mut attr).map(drop)
}

/// Detaches `prog` from device `ifindex`'s TCX hook `attach_type`.
pub(crate) fn tcx_detach(
    ifindex: u32,
    attach_type: u32,
    prog: BorrowedFd<'_>,
) -> Result<(), SysError> {
    let mut attr = AttachAttr {
        target_ifindex: ifindex,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    bpf(BPF_PROG_DETACH, "BPF_PROG_DETACH", &mut attr).map(drop)
}

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    count: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Ids of the programs attached to device `ifindex` at a TCX hook, in
/// run order. A device without TCX attachments has none.
pub(crate) fn tcx_query(ifindex: u32, attach_type: u32) -> Result<Vec<u32>, SysError> {
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_ifindex: ifindex,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        count: ids.len() as u32,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, "BPF_PROG_QUERY", &mut attr)?;
    Ok(ids[..(attr.count as usize).min(ids.len())].to_vec())
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
    _pad: u32,
}

/// A file descriptor for the loaded program `id`.
pub(crate) fn prog_fd_by_id(id: u32) -> Result<OwnedFd, SysError> {
    let mut attr = GetFdByIdAttr {
        id,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, "BPF_PROG_GET_FD_BY_ID", &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A program's name (`bpf_prog_info.name`, at most 15 bytes).
pub(crate) fn prog_name(prog: BorrowedFd<'_>) -> Result<String, SysError> {
    // struct bpf_prog_info: name[16] sits at byte 64.
    let mut info = [0u8; 80];
    let mut attr = InfoAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, "BPF_OBJ_GET_INFO_BY_FD", &mut attr)?;
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}
