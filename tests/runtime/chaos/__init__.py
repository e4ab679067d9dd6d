"""Tests of the chaos tooling."""
