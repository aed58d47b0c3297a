"""A guest kernel of four bytes, for running tidevm on any /dev/kvm.

`halt_elf(path)` writes a minimal x86_64 ELF executable whose entry point is
`cli; hlt; jmp $-1`: tidevm loads it like a vmlinux, the vCPU halts in KVM
for good and the VM stays up, with its devices and API, without booting
Linux. It runs on a /dev/kvm that cannot boot Linux (this project's
kvm_pvm hosts), so API tests and benchmarks need no nested harness.
Used by tools/bench-api and tools/api-conformance.
"""

import struct

# cli; hlt; jmp back to the hlt (an interrupt cannot arrive with IF clear,
# but an NMI or a spurious wakeup would land on the jmp).
HALT_CODE = bytes([0xFA, 0xF4, 0xEB, 0xFD])
LOAD_ADDRESS = 0x100_0000
FILE_OFFSET = 0x1000


def halt_elf(path):
    """Writes the halting ELF kernel to path."""
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, LSB, SysV
    # ET_EXEC for x86-64, entry at the code, one program header right after
    # the 64-byte ELF header, no sections.
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, LOAD_ADDRESS, 64, 0, 0,
                               64, 56, 1, 0, 0, 0)
    # One PT_LOAD, R+X, of the code at LOAD_ADDRESS.
    phdr = struct.pack("<IIQQQQQQ", 1, 5, FILE_OFFSET, LOAD_ADDRESS, LOAD_ADDRESS,
                       len(HALT_CODE), len(HALT_CODE), 0x1000)
    head = ehdr + phdr
    with open(path, "wb") as f:
        f.write(head + bytes(FILE_OFFSET - len(head)) + HALT_CODE)
