"""vmsim: a simulated virtual-memory testbed for ELF loading."""
