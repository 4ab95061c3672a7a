"""Provider presets and the quirk knobs that shape token requests and read token answers.

``presets``: the catalogue shipped with the package (``catalogue.yaml``) and ``providers_file``
entries, as plain data, merged under an upstream's ``auth_broker`` by broker.config.
``shaping``: pure functions the connect and refresh use cases call to build authorization URLs
and token requests and to read token answers from an upstream's knobs. No provider is named in
code: every quirk is a key of the catalogue's schema.
"""
