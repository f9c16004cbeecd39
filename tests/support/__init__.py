"""Helpers the tests share: fixtures, job sizes, real-service wrappers. Not tests themselves."""
