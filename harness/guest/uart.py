"""An emulated Arm PL011 UART (output only), serviced on KVM_EXIT_MMIO by the handler.

The page is not backed by a memory slot, so every access by the guest exits to userspace (api.rst
KVM_EXIT_MMIO).  Enough of the PrimeCell UART (Arm DDI 0183G, "PrimeCell UART (PL011) Technical Reference
Manual", §3 Programmer's model) for Linux's ``earlycon=pl011`` and the ``amba-pl011`` driver doing polled
output:

* UARTDR (0x000) writes are transmitted (captured); reads return 0 (no input is ever queued).
* UARTFR (0x018) reads: TX FIFO empty, RX FIFO empty, not busy (TXFE | RXFE) — output never blocks.
* UARTRIS/UARTMIS read 0: no interrupt is ever raised (nothing needs one for polled output).
* UARTPeriphID0-3 / UARTPCellID0-3 (0xFE0-0xFFC): the PL011 r1p5 IDs, which the AMBA bus reads at probe.
* Other registers (IBRD, FBRD, LCR_H, CR, IFLS, IMSC, DMACR ...) store and read back what was written.
* While UARTCR.LBE (loopback) is set, transmitted bytes are not captured.
"""

from __future__ import annotations

import threading

DR = 0x000
FR = 0x018
CR = 0x030
RIS = 0x03C
MIS = 0x040
ICR = 0x044
FR_TXFE = 1 << 7
FR_RXFE = 1 << 4
CR_LBE = 1 << 7
PERIPH_ID = 0x0014_1011     # part 0x011, designer 0x41 (Arm), revision 1
PCELL_ID = 0xB105_F00D
SIZE = 0x1000


class Pl011:
    def __init__(self, base: int, on_line=None, max_bytes: int = 4 << 20):
        self.base = base
        self.on_line = on_line          # called with each complete output line (str, without "\n")
        self.max_bytes = max_bytes
        self.out = bytearray()
        self.dropped = 0
        self._line = bytearray()
        self._regs: dict[int, int] = {}
        self._lock = threading.Lock()
        self.reads = 0
        self.writes = 0

    def contains(self, addr: int) -> bool:
        return self.base <= addr < self.base + SIZE

    def read(self, addr: int, length: int) -> int:
        off = addr - self.base
        self.reads += 1
        if off == FR:
            return FR_TXFE | FR_RXFE
        if off in (DR, RIS, MIS):
            return 0
        if 0xFE0 <= off <= 0xFFC:
            word = PERIPH_ID if off < 0xFF0 else PCELL_ID
            return (word >> (8 * ((off & 0xF) // 4))) & 0xFF
        with self._lock:
            return self._regs.get(off & ~3, 0)

    def write(self, addr: int, length: int, value: int) -> None:
        off = addr - self.base
        self.writes += 1
        if off == DR:
            with self._lock:
                if self._regs.get(CR, 0) & CR_LBE:
                    return
                self._put(value & 0xFF)
            return
        if off == ICR:
            return
        with self._lock:
            self._regs[off & ~3] = value

    def _put(self, byte: int) -> None:
        if len(self.out) < self.max_bytes:
            self.out.append(byte)
        else:
            self.dropped += 1
        if byte == 0x0A:
            line = self._line.decode(errors="replace").rstrip("\r")
            self._line.clear()
            if self.on_line is not None:
                self.on_line(line)
        else:
            self._line.append(byte)

    def flush(self) -> None:
        """Deliver a last, unterminated line."""
        with self._lock:
            if self._line:
                line = self._line.decode(errors="replace").rstrip("\r")
                self._line.clear()
                if self.on_line is not None:
                    self.on_line(line)

    def text(self) -> str:
        return self.out.decode(errors="replace")
