//! Legacy PC devices: 16550 UART, i8042 reset, ACPI power management.
