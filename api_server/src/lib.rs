//! api_server
