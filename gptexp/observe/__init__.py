"""Readers of run directories: layout, status, lock, metrics and their names, rows, tables and
seed groups. What compare and the other commands read without training anything. No torch."""
