"""models/lm"""
