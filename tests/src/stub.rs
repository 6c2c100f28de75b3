//! A guest kernel for hypervisors that cannot boot a real one here: an ELF with a PVH entry
//! (the `XEN_ELFNOTE_PHYS32_ENTRY` note) whose 32-bit code writes kestrel's ready line to the
//! serial port at 0x3f8 and halts for ever. Cloud Hypervisor (and QEMU) boot it in
//! milliseconds; it never powers off, so every end of it is a hypervisor's.

use std::path::{Path, PathBuf};

/// Where the code is loaded and entered (1 MiB, physical).
const LOAD: u32 = 0x10_0000;
/// What it says on the console by default.
pub const READY: &str = "kestrel: ready ip=none mode=stub\n";

/// The code: print `says` byte by byte on COM1, then `cli; hlt` for ever.
fn code(says: &str) -> Vec<u8> {
    let msg_at = LOAD + 21;
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    c.push(0xbe); // mov esi, msg
    c.extend(msg_at.to_le_bytes());
    c.extend([
        0xac, // next: lodsb
        0x84, 0xc0, // test al, al
        0x74, 0x03, // jz done
        0xee, // out dx, al
        0xeb, 0xf8, // jmp next
        0xfa, // done: cli
        0xf4, // hlt
        0xeb, 0xfc, // jmp done
    ]);
    assert_eq!(c.len() as u32, msg_at - LOAD);
    c.extend(says.as_bytes());
    c.push(0);
    c
}

/// The ELF image saying `says`: header, a loadable segment with the code and a note segment
/// with the entry.
pub fn image(says: &str) -> Vec<u8> {
    let (ehsize, phsize, phnum) = (64u16, 56u16, 2u16);
    let note_off = u64::from(ehsize + phsize * phnum);
    let code_off = 0x1000u64;
    let code = code(says);
    let mut note = Vec::new();
    for field in [4u32, 4, 18] {
        note.extend(field.to_le_bytes()); // namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
    }
    note.extend(b"Xen\0");
    note.extend(LOAD.to_le_bytes());
    let mut elf = b"\x7fELF".to_vec();
    elf.extend([2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
    elf.extend([0u8; 8]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // x86-64
    elf.extend(1u32.to_le_bytes());
    elf.extend(u64::from(LOAD).to_le_bytes()); // entry
    elf.extend(u64::from(ehsize).to_le_bytes()); // program headers
    elf.extend(0u64.to_le_bytes()); // no section headers
    elf.extend(0u32.to_le_bytes());
    for half in [ehsize, phsize, phnum, 64, 0, 0] {
        elf.extend(half.to_le_bytes());
    }
    let segment = |kind: u32, flags: u32, off: u64, addr: u64, len: u64, align: u64| {
        let mut p = Vec::new();
        p.extend(kind.to_le_bytes());
        p.extend(flags.to_le_bytes());
        for v in [off, addr, addr, len, len, align] {
            p.extend(v.to_le_bytes());
        }
        p
    };
    let load = u64::from(LOAD);
    elf.extend(segment(1, 5, code_off, load, code.len() as u64, 0x1000)); // PT_LOAD, R+X
    elf.extend(segment(4, 4, note_off, 0, note.len() as u64, 4)); // PT_NOTE
    elf.extend(&note);
    elf.resize(code_off as usize, 0);
    elf.extend(code);
    elf
}

/// Writes the kernel saying `says` as `<name>-vmlinux`, and an initramfs (a hypervisor loads
/// one; the stub ignores it), into `dir`.
pub fn write(dir: &Path, name: &str, says: &str) -> (PathBuf, PathBuf) {
    let (kernel, initramfs) = (
        dir.join(format!("{name}-vmlinux")),
        dir.join("stub-initramfs"),
    );
    std::fs::write(&kernel, image(says)).expect("writing the stub kernel");
    std::fs::write(&initramfs, [0u8; 512]).expect("writing the stub initramfs");
    (kernel, initramfs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_image_is_the_one_cloud_hypervisor_was_seen_to_boot() {
        let img = super::image(super::READY);
        assert_eq!(&img[..4], b"\x7fELF");
        assert_eq!(img.len(), 0x1000 + 21 + super::READY.len() + 1);
        assert_eq!(&img[0x1000..0x1005], &[0x66, 0xba, 0xf8, 0x03, 0xbe]);
    }
}
