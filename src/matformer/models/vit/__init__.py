"""models/vit"""
