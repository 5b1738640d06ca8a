"""swarmgate"""
