"""mambavlm"""
