"""slicing"""
