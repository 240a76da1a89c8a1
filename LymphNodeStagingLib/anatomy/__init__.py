"""Anatomy label maps in one vocabulary, and the TotalSegmentator runner."""
